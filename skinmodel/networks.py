"""The networks: constructors by name, weight files, the penultimate features and the "is this dermoscopy"
score computed on them. Shared by training, the handler, Grad-CAM and the int8 export.

Every network is a torchvision model built with weights=None: the weights always come from this
project's own state_dict files, never from a download at serving time. Features are caught by a forward
hook on the classifier head, so the network's own forward runs unchanged (fp32 and int8 alike).
"""
from __future__ import annotations

import torch
from torch import nn

from skinmodel.preprocessing import COLOUR_LAYOUT, COLOUR_STATISTICS

# Only networks with the whole release path (dermoscopy check on their `fc` features, Grad-CAM on `layer4`, tested):
# convnext_tiny was offered once without either and is gone.
ARCHITECTURES = ("resnet18", "resnet50")
# The colour layout of statistics saved before they carried its name (releases 2.1 and 2.2): never to change.
UNNAMED_COLOUR_LAYOUT = "log-sog6-illuminant-3,log-mean-3,std-3,sqrt-rgb-grid-4^3"
INT8_ENGINE = "x86"


def quantizable_resnet18(num_classes: int, fp32_state_dict: dict | None = None) -> nn.Module:
    """torchvision's quantizable ResNet18 (same tensors as resnet18), fused and prepared for int8. The fp32
    weights must go in before fusion: fusing folds BatchNorm into the convolutions and renames the tensors."""
    from torchvision.models.quantization import resnet18 as qresnet18

    torch.backends.quantized.engine = INT8_ENGINE
    model = qresnet18(weights=None, num_classes=num_classes, quantize=False).eval()
    if fp32_state_dict is not None:
        model.load_state_dict(fp32_state_dict)  # strict: every tensor must land
    model.fuse_model(is_qat=False)
    model.qconfig = torch.ao.quantization.get_default_qconfig(INT8_ENGINE)
    return torch.ao.quantization.prepare(model)


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A network by name. 'resnet18_int8' is the converted int8 structure its saved state_dict loads into."""
    import torchvision.models as tvm

    if arch == "resnet18_int8":
        import warnings

        with warnings.catch_warnings():  # empty observers: the real scales come with the state_dict
            warnings.simplefilter("ignore", UserWarning)
            return torch.ao.quantization.convert(quantizable_resnet18(num_classes))
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")  # a caller's bug
    return getattr(tvm, arch)(weights=None, num_classes=num_classes)


def load_state_dict_file(path, map_location="cpu") -> dict:
    """Plain state_dict (weights_only) stored in fp16 or fp32 (returned as fp32), or an int8 one (as is)."""
    from collections import OrderedDict

    state = torch.load(path, map_location=map_location, weights_only=True)
    out = OrderedDict((k, v.float() if torch.is_tensor(v) and v.is_floating_point() and not v.is_quantized else v)
                      for k, v in state.items())
    out._metadata = getattr(state, "_metadata", None)  # quantized modules read their format version from it
    return out


class ProbabilityEnsemble(nn.Module):
    """Averages members' probabilities and returns log-probabilities, usable wherever logits are.

    softmax(log p / T) = p^(1/T) / sum(p^(1/T)), so temperature-scaled distillation stays well defined.
    """

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        probs = torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(1e-8).log()


class DihedralTTA(nn.Module):
    """Test-time augmentation over the 8 flips and right-angle rotations (dermoscopy has no up or down): the
    mean of the 8 views' probabilities, returned as log-probabilities like ProbabilityEnsemble. For a teacher
    only: it costs 8 forward passes, and the served handler scores one view."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        probs = 0
        for k in range(4):
            turned = torch.rot90(x, k, (2, 3))
            for view in (turned, turned.flip(3)):
                probs = probs + self.model(view).softmax(dim=1)
        return (probs / 8).clamp_min(1e-8).log()


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (what the classifier head `fc` receives) and logits, from one ordinary forward pass."""
    head = model.fc
    caught = {}
    handle = head.register_forward_hook(lambda _module, inputs, _output: caught.__setitem__("features", inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    feats = caught["features"]
    return (feats.dequantize() if feats.is_quantized else feats), logits


def mahalanobis_distance(feats: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Smallest class-conditional Mahalanobis distance (shared covariance), per row of feats."""
    diff = feats[:, None, :] - means[None, :, :]
    d2 = torch.einsum("nkd,de,nke->nk", diff, precision, diff)
    return d2.clamp_min(0).min(dim=1).values.sqrt()


def check_inputs(feats: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """What the dermoscopy check scores, one row per image: the penultimate features, then the picture's colour
    statistics before the colour constancy (skinmodel.preprocessing.colour_statistics)."""
    return torch.cat([feats.float(), colour.float().to(feats.device)], dim=1)


def check_statistics_width(stats: dict) -> int:
    """How many of check_inputs' columns the dermoscopy check's statistics read, from the first."""
    if "fc_weight" in stats:
        return stats["fc_weight"].shape[1]
    return len(stats["mean"]) if "mean" in stats else stats["means"].shape[1]


def load_check_statistics(path) -> dict:
    """The dermoscopy check's statistics file: its tensors as float32, and the name of its colour layout if any."""
    stats = torch.load(path, weights_only=True)
    return {k: v if isinstance(v, str) else v.float() for k, v in stats.items()}


def name_colour_layout(stats: dict, features: int) -> dict:
    """The statistics to save, with the name of the colour layout they were fitted on where they read colours."""
    if check_statistics_width(stats) > features:
        return {**stats, "colour_layout": COLOUR_LAYOUT}
    return stats


def validate_check_statistics(stats: dict, features: int) -> None:
    """Statistics must read the network's features alone or the features and every colour statistic, in the layout
    this code computes: anything else was fitted on another network or on other colours, and is refused when the
    release loads."""
    width = check_statistics_width(stats)
    if width not in (features, features + COLOUR_STATISTICS):
        raise ValueError(f"the dermoscopy check's statistics read {width} columns; this network gives {features} "
                         f"features and each picture {COLOUR_STATISTICS} colour statistics")
    layout = stats.get("colour_layout", UNNAMED_COLOUR_LAYOUT)
    if width > features and layout != COLOUR_LAYOUT:
        raise ValueError(f"the dermoscopy check's statistics were fitted on the colour layout {layout!r}; this code "
                         f"computes {COLOUR_LAYOUT!r}")


def dermoscopy_check_score(inputs: torch.Tensor, stats: dict) -> torch.Tensor:
    """The dermoscopy check's score: how unlike a dermoscopy image a picture is; the verdict compares it with
    meta.json's dermoscopy_check thresholds. `inputs`: check_inputs' rows; each kind of statistics reads the columns
    it was fitted on, from the first (the features alone up to release 1.3, the features and the colours since 2.1),
    and fails on fewer. With an "is this dermoscopy" head (weight, bias, mean, scale): its logit of "not dermoscopy"
    (training/dermoscopy/check.py); with hidden_weight and hidden_bias too, the same logit through one hidden layer
    of ReLU units. Without (release 1.0's first statistics): the smallest class-conditional Mahalanobis distance.
    With the classifier's own head (fc_weight, fc_bias): the energy score, -logsumexp of the logits."""
    n = check_statistics_width(stats)
    if inputs.shape[1] < n:
        raise ValueError(f"the dermoscopy check reads {n} columns, the inputs have {inputs.shape[1]}")
    inputs = inputs[:, :n]
    if "fc_weight" in stats:
        return -torch.logsumexp(inputs @ stats["fc_weight"].T + stats["fc_bias"], dim=1)
    if "weight" in stats:
        x = (inputs - stats["mean"]) / stats["scale"]
        if "hidden_weight" in stats:
            x = torch.relu(x @ stats["hidden_weight"].T + stats["hidden_bias"])
        return x @ stats["weight"] + stats["bias"]
    return mahalanobis_distance(inputs, stats["means"], stats["precision"])
