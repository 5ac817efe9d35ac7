"""Shifted copies of lesion photos: what images from other clinics, cameras and settings do to a model that only
saw HAM10000. Ten families, each drawn at random within a range, deterministic for a seed.

Used to fit the dermoscopy check (training copies), to choose its threshold (validation copies) and to
report its false refusals per family (test copies): `python -m training dermoscopy-check`.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def _colour_temperature(img, rng):  # white balance: warmer or cooler light
    k = rng.uniform(-0.25, 0.25)
    a = np.asarray(img, np.float32) * np.array([1 + k, 1.0, 1 - k])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _zoom(img, rng):  # 0.7-1.4: closer (cropped) or farther (black margin, as a dermatoscope's field)
    z, (w, h) = rng.uniform(0.7, 1.4), img.size
    if z >= 1:
        cw, ch = int(w / z), int(h / z)
        left, top = (w - cw) // 2, (h - ch) // 2
        return img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
    small = img.resize((int(w * z), int(h * z)), Image.BICUBIC)
    out = Image.new("RGB", (w, h), (0, 0, 0))
    out.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
    return out


def _resolution(img, rng):  # another camera: a coarser sensor, or a 4x larger photo
    w, h = img.size
    if rng.random() < 0.5:
        f = rng.uniform(0.35, 0.6)
        return img.resize((int(w * f), int(h * f)), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    return img.resize((w * 4, h * 4), Image.BICUBIC)


def _vignette(img, rng):  # dark corners, or a round field of view with black outside
    w, h = img.size
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
    if rng.random() < 0.5:
        mask = (d < rng.uniform(0.95, 1.15)).astype(np.float32)
    else:
        mask = np.clip(1 - rng.uniform(0.3, 0.9) * np.clip(d - 0.6, 0, None) / 0.8, 0, 1)
    return Image.fromarray((np.asarray(img, np.float32) * mask[..., None]).astype(np.uint8))


FAMILIES = {
    "colour temperature": _colour_temperature,
    "brightness": lambda img, rng: ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4)),
    "contrast": lambda img, rng: ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4)),
    "saturation": lambda img, rng: ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5)),
    "blur": lambda img, rng: img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0))),
    "JPEG quality 30-60": None,  # re-encoded, not transformed
    "zoom 0.7-1.4": _zoom,
    "rotation": lambda img, rng: img.rotate(rng.uniform(10, 350), resample=Image.BILINEAR, fillcolor=(0, 0, 0)),
    "source resolution": _resolution,
    "vignette": _vignette,
}


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def shifted(img: Image.Image, family: str, seed: int) -> bytes:
    """The image file a user from elsewhere might send: img under one draw of `family`."""
    rng = np.random.default_rng(seed)
    if FAMILIES[family] is None:
        return encode(img.convert("RGB"), "JPEG", quality=int(rng.integers(30, 61)))
    return encode(FAMILIES[family](img.convert("RGB"), rng))
