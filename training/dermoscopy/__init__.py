"""The dermoscopy check ("is this picture dermoscopy at all?", the verdict `not_dermoscopy`), fitted for a release:
the step itself (`abstention`: `python -m training trust`), the rejectors it compares on validation sources
(`rejectors`, `outlier_exposure`), its data (`gate_pool`: pictures that Debian and PyPI packages ship, split whole
by source; `nonskin`: drawn pictures; `shifts`: lesions under other clinics' light and cameras) and the lesion
features it is fitted on (`gate_features`). Not to be confused with the page's HTTP gate (stack/gate.py).
"""
