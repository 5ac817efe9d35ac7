"""The light half of preprocessing: its parameters (PreprocessConfig, as they travel in meta.json and in
checkpoints) and its refusals (InputError). No numpy, torch or Pillow here, so ReleaseMeta and the page
build can use them without the heavy half (skinmodel/preprocessing.py re-exports both).
"""
from __future__ import annotations

from dataclasses import dataclass

# Colour constancy applied to the resized image before the crop, identically in training and serving:
# "none", or Shades of Gray with Minkowski norm p = 6 (Finlayson & Trezzi 2004; the norm used by ISIC
# challenge winners), which maps the image's estimated illuminant to grey.
COLOUR_CONSTANCIES = ("none", "shades_of_gray_p6")

# Far above any dermoscopy photo (a 24 MP camera is 24e6), far below a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000


class InputError(ValueError):
    """A request the service must refuse: carries an HTTP status and a reason meant for people."""

    def __init__(self, status: int, code: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class PreprocessConfig:
    """The parameters that travel in meta.json; nothing else decides how pixels become a tensor."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int = DEFAULT_MAX_PIXELS
    colour_constancy: str = "none"  # one of COLOUR_CONSTANCIES

    def __post_init__(self):
        if self.colour_constancy not in COLOUR_CONSTANCIES:
            raise ValueError(f"unknown colour constancy {self.colour_constancy!r}; "
                             f"this code knows {', '.join(COLOUR_CONSTANCIES)}")

    @classmethod
    def from_dict(cls, p: dict) -> "PreprocessConfig":
        """From its one serialised form (meta.json's "preprocessing", a checkpoint's "preprocessing")."""
        return cls(int(p["resize_size"]), int(p["crop_size"]), tuple(float(v) for v in p["mean"]),
                   tuple(float(v) for v in p["std"]), int(p.get("max_pixels", DEFAULT_MAX_PIXELS)),
                   str(p.get("colour_constancy", "none")))

    def to_dict(self) -> dict:
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "mean": list(self.mean),
                "std": list(self.std), "max_pixels": self.max_pixels, "interpolation": "bilinear",
                "colour_constancy": self.colour_constancy}
