"""Training augmentation as batched tensor operations on whatever device holds the images.

Every sample of a batch draws its own transform: a random resized crop (area 50-100 %, aspect 0.8-1.25), a
horizontal and a vertical flip (p = 0.5 each), a rotation of up to 30 degrees (dermoscopy has no up or down)
and a colour jitter (brightness and contrast 0.15, saturation 0.1, hue 0.02). The geometry becomes one 2x3
affine matrix per sample, applied with affine_grid + grid_sample; the colour is arithmetic on the batch. On a
GPU this keeps pace with the network; decoding and transforming images one by one on the CPU would not.

The draws come from a generator seeded by (seed, epoch, step) for the whole global batch, and each rank takes
its rows: the images a sample turns into do not depend on how many processes share the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCALE = (0.5, 1.0)           # share of the source area a crop covers
RATIO = (0.8, 1.25)          # crop aspect ratio (width / height)
DEGREES = 30.0
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.15, 0.15, 0.1, 0.02
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)  # inverted once, on the CPU


@dataclass
class Draws:
    """One sample's transform per row; every field a (B,) float tensor."""

    area: torch.Tensor
    log_ratio: torch.Tensor
    cx: torch.Tensor             # crop centre, as a fraction of the free range (0 = leftmost, 1 = rightmost)
    cy: torch.Tensor
    flip_x: torch.Tensor         # +1 or -1
    flip_y: torch.Tensor
    angle: torch.Tensor          # radians
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor            # fraction of a full turn

    def rows(self, sl: slice) -> "Draws":
        return Draws(**{k: v[sl] for k, v in vars(self).items()})

    def to(self, device) -> "Draws":
        return Draws(**{k: v.to(device) for k, v in vars(self).items()})


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The same stream on every rank for a given (seed, epoch, step)."""
    return torch.Generator().manual_seed(((seed * 100_003 + epoch) * 1_000_003 + step) % (2**63))


def draw(n: int, gen: torch.Generator) -> Draws:
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    def sign():
        return torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)

    return Draws(area=uniform(*SCALE), log_ratio=uniform(math.log(RATIO[0]), math.log(RATIO[1])),
                 cx=torch.rand(n, generator=gen), cy=torch.rand(n, generator=gen), flip_x=sign(), flip_y=sign(),
                 angle=uniform(-DEGREES, DEGREES) * math.pi / 180,
                 brightness=uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS), contrast=uniform(1 - CONTRAST, 1 + CONTRAST),
                 saturation=uniform(1 - SATURATION, 1 + SATURATION), hue=uniform(-HUE, HUE))


def affine(d: Draws, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) matrices mapping output coordinates in [-1, 1] to source coordinates in [-1, 1]
    (align_corners=False): scale to the crop, flip, rotate in pixel space, move to the crop centre."""
    area = d.area * height * width
    ratio = d.log_ratio.exp()
    crop_w = (area * ratio).sqrt().clamp(max=width)
    crop_h = (area / ratio).sqrt().clamp(max=height)
    centre_x = crop_w / 2 + d.cx * (width - crop_w)
    centre_y = crop_h / 2 + d.cy * (height - crop_h)
    cos, sin = d.angle.cos(), d.angle.sin()
    half_w, half_h = d.flip_x * crop_w / 2, d.flip_y * crop_h / 2
    theta = torch.stack([
        torch.stack([2 / width * cos * half_w, -2 / width * sin * half_h, 2 * centre_x / width - 1], 1),
        torch.stack([2 / height * sin * half_w, 2 / height * cos * half_h, 2 * centre_y / height - 1], 1),
    ], 1)
    return theta


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Hue rotation as a rotation of the chroma plane in YIQ space: exact for grey, close to HSV's hue shift
    for the small angles used here, and differentiable arithmetic instead of a per-pixel HSV round trip."""
    to_yiq, from_yiq = _TO_YIQ.to(x.device, x.dtype), _FROM_YIQ.to(x.device, x.dtype)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    a = turns * 2 * math.pi
    cos, sin = a.cos().view(-1, 1, 1), a.sin().view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    return torch.einsum("ij,bjhw->bihw", from_yiq, yiq)


def colour(x: torch.Tensor, d: Draws) -> torch.Tensor:
    """Brightness, contrast, saturation, hue on float images in [0, 1], clamped after each step as torchvision's
    ColorJitter does."""
    view = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    x = (x * view(d.brightness)).clamp(0, 1)
    mean = _grey(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * view(d.contrast) + mean).clamp(0, 1)
    grey = _grey(x)
    x = ((x - grey) * view(d.saturation) + grey).clamp(0, 1)
    return _rotate_hue(x, d.hue).clamp(0, 1)


def augment(images_uint8: torch.Tensor, d: Draws, crop: int, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> normalised float (B, 3, crop, crop), each row under its own draw."""
    d = d.to(images_uint8.device)
    x = images_uint8.float().div_(255.0)
    n, _, height, width = x.shape
    grid = F.affine_grid(affine(d, height, width), [n, 3, crop, crop], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = colour(x, d)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


MIXES = ("none", "mixup", "cutmix")


def draw_mix(n: int, gen: torch.Generator, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the share lam ~ Beta(alpha, alpha) it keeps of itself, and a box centre (cutmix), both from
    the step's generator (numpy's Beta, seeded from it: torch's Beta takes no generator)."""
    import numpy as np

    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, n)).float()
    return lam, torch.rand(n, 2, generator=gen)


def mix(x: torch.Tensor, lam: torch.Tensor, centres: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample mixed with its partner, the sample at the mirrored position of the same micro-batch (x.flip(0):
    the same pairs whatever the number of ranks). mixup blends the pixels; cutmix pastes a box of area 1 - lam of
    the partner. Returns the images and the share of each that is its own (the loss weights the two labels so)."""
    partner = x.flip(0)
    lam = lam.to(x.device, x.dtype)
    if kind == "mixup":
        return x * lam.view(-1, 1, 1, 1) + partner * (1 - lam).view(-1, 1, 1, 1), lam
    if kind != "cutmix":
        raise ValueError(f"unknown mix {kind!r}")
    n, _, height, width = x.shape
    side = (1 - lam).sqrt()
    c = centres.to(x.device, x.dtype)
    top = (c[:, 1] * height - side * height / 2).round().clamp(0, height)
    bottom = (c[:, 1] * height + side * height / 2).round().clamp(0, height)
    left = (c[:, 0] * width - side * width / 2).round().clamp(0, width)
    right = (c[:, 0] * width + side * width / 2).round().clamp(0, width)
    rows = torch.arange(height, device=x.device, dtype=x.dtype).view(1, height, 1)
    cols = torch.arange(width, device=x.device, dtype=x.dtype).view(1, 1, width)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < bottom.view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < right.view(-1, 1, 1)))
    own = 1 - box.flatten(1).float().mean(1)  # the box as it landed, clipped at the edges
    return torch.where(box.unsqueeze(1), partner, x), own.to(x.dtype)
