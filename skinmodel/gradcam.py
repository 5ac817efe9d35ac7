"""Grad-CAM (Selvaraju et al., 2017) for the ResNets served here, drawn over the uploaded image as a PNG.

Cost is one forward and one backward pass of a single image plus a PNG encode of at most 512 px per side.
The last convolutional block's output is caught by a forward hook: the network's own forward runs unchanged.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MAX_SIDE = 512


def grad_cam(model, x: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, int, torch.Tensor]:
    """x: (1, 3, H, W) normalised. Returns (cam in [0, 1] of shape H x W, class explained, logits)."""
    caught = {}
    handle = model.layer4.register_forward_hook(lambda _module, _inputs, output: caught.__setitem__("fmap", output))
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))  # a graph even if the weights are frozen
            target = int(logits.argmax(1)) if target is None else int(target)
            fmap = caught["fmap"]
            (grads,) = torch.autograd.grad(logits[0, target], fmap)
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = cam / cam.max() if cam.max() > 0 else cam
    return cam.numpy(), target, logits.detach()


def _heat_colours(cam: np.ndarray) -> np.ndarray:
    """A blue -> yellow -> red ramp, readable for most colour-vision deficiencies."""
    r = np.clip(1.5 * cam, 0, 1)
    g = np.clip(1.5 - np.abs(2 * cam - 1) * 1.5, 0, 1)
    b = np.clip(1 - 2 * cam, 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay_png(original: Image.Image, cam: np.ndarray, resize_size: int, crop_size: int) -> tuple[bytes, tuple]:
    """Blend the CAM over the region of the original image the model saw (the centre crop); the rest is dimmed.
    The PNG has the upload's size, scaled down to at most MAX_SIDE px. Returns (png bytes, crop box)."""
    img = original.convert("RGB")
    scale = min(1.0, MAX_SIDE / max(img.size))
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    w, h = img.size
    side = min(w, h) * crop_size / resize_size  # the centre crop, in this image's pixels
    box = (round((w - side) / 2), round((h - side) / 2), round((w + side) / 2), round((h + side) / 2))
    base = np.asarray(img, dtype=np.float32) * 0.55  # dim everything the model did not see
    region = np.asarray(img.crop(box), dtype=np.float32)
    size = (box[2] - box[0], box[3] - box[1])
    heat_cam = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(size, Image.BILINEAR)) / 255.0
    alpha = 0.2 + 0.45 * heat_cam[..., None]
    base[box[1]:box[3], box[0]:box[2]] = region * (1 - alpha) + _heat_colours(heat_cam) * alpha
    buf = io.BytesIO()
    Image.fromarray(base.astype(np.uint8)).save(buf, "PNG", optimize=True)
    return buf.getvalue(), box
