"""The skin-lesion model as code, shared by training, the TorchServe handler, the logger and the tools.

preprocessing (bytes -> tensor, with its decoding budget), its light half inputs (PreprocessConfig,
InputError) and formats (what counts as an image) · networks (constructors, features through a forward hook,
the dermoscopy check's score) · gradcam · release (ReleaseMeta: the typed meta.json that travels with the weights) · answers (what a prediction looks like) · payload (what a request
looks like) · audit (the event every answer leaves, and its spool).

The .mar ships this folder as it is; nothing here imports from training/, stack/ or handler/, and
`formats`, `inputs` and `release` import nothing heavy (the gate and the page build load them without
torch). Importing the package imports nothing.
"""
