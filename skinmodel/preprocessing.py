"""The one preprocessing definition of the project.

Training's evaluation, the TorchServe handler and the benchmarks all import this module, so the
tensor a served image turns into is, bit for bit, the tensor the test metrics were computed on.
The chain is: bytes -> decode (format, size and JPEG scans checked from the header first) -> EXIF
orientation -> RGB -> resize shorter side -> colour constancy (when the release has one) -> centre crop ->
uint8 CHW -> float, normalised.

Decoding has a budget that no accepted file can exceed: the five formats the page lists, a pixel count and
a decoded-bytes count checked before any pixel is decoded, at most MAX_JPEG_SCANS scans, and JPEGs far larger
than the model input decoded at a reduced DCT scale (Pillow's draft mode) instead of in full.

"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from skinmodel.formats import ACCEPTED_FORMATS, ACCEPTED_LABEL, MAX_JPEG_SCANS, jpeg_scan_count
from skinmodel.inputs import DEFAULT_MAX_PIXELS, InputError, PreprocessConfig

__all__ = ["DEFAULT_MAX_PIXELS", "InputError", "PreprocessConfig", "decode_image", "eval_uint8", "normalize",
           "preprocess_bytes", "resize_center_crop", "shades_of_gray"]

# What one decoded image may weigh, counted as bands x bytes per band: 40 MP of 8-bit RGB. Modes with more
# bytes per pixel (RGBA, CMYK, 32-bit integer or float) get proportionally fewer pixels.
BYTES_PER_ALLOWED_PIXEL = 3
# A JPEG whose shorter side is at least this many times the size the model needs is decoded at 1/2, 1/4 or
# 1/8 scale (never below that size) instead of in full: a 40 MP photo then costs a worker ~2 % of the memory.
DRAFT_ABOVE = 2
# Modes Pillow can turn into RGB without guessing; anything else is refused with a reason.
_DIRECT_TO_RGB = {"RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_BIT_DEPTH:
        # 16-bit and float greyscale: scale the real range to 8 bits instead of clipping at 255. Converted in
        # bands of rows: whole-image float64 copies made a 268 KB float TIFF cost a worker 1.2 GB.
        src = np.asarray(img)
        peak = float(src.max()) if src.size else 0.0
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and peak > 255) else 255.0
        if mode == "F":
            top = max(peak, 1e-12) if peak > 1.0 else 1.0
        out = np.empty(src.shape, dtype=np.uint8)
        for row in range(0, src.shape[0], 256):
            band = src[row:row + 256].astype(np.float64) * (255.0 / top) + 0.5
            out[row:row + 256] = np.clip(band, 0, 255)
        return Image.fromarray(out, "L").convert("RGB")
    if mode in _WITH_ALPHA or (mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as the image looks on a web page.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _DIRECT_TO_RGB:
        return img.convert("RGB")
    raise InputError(415, "unsupported_mode", f"unsupported image mode {mode!r}")


def _decoded_bytes(img: Image.Image) -> int:
    mode = ImageMode.getmode(img.mode)
    return img.size[0] * img.size[1] * len(mode.bands) * max(1, int(mode.typestr[-1]))


def _check_budget(img: Image.Image, data: bytes, max_pixels: int) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InputError(422, "bad_dimensions", f"the image declares a size of {width}x{height}")
    if width * height > max_pixels:
        raise InputError(413, "too_many_pixels",
                         f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if _decoded_bytes(img) > BYTES_PER_ALLOWED_PIXEL * max_pixels:
        raise InputError(413, "too_many_pixels", f"a {width}x{height} image in mode {img.mode} decodes to "
                         f"{_decoded_bytes(img)} bytes; the limit is {BYTES_PER_ALLOWED_PIXEL * max_pixels}")
    if img.format == "JPEG" and jpeg_scan_count(data) > MAX_JPEG_SCANS:
        raise InputError(422, "too_many_scans", f"the JPEG has more than {MAX_JPEG_SCANS} progressive scans; "
                         "no camera or common encoder writes that many (re-save it as a baseline JPEG)")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, info: dict | None = None,
                 min_side: int | None = None) -> Image.Image:
    """Bytes -> upright RGB PIL image, or InputError. Format, pixel count, decoded size and JPEG scans are
    checked before decoding. With min_side, a JPEG whose shorter side is DRAFT_ABOVE times min_side or more
    is decoded at the smallest DCT scale that keeps its shorter side >= min_side.
    If `info` is given it receives the file's format, mode and size (for the audit log)."""
    if data is None or len(data) == 0:
        raise InputError(400, "empty_body", "the request body is empty; send an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise InputError(415, "not_an_image", f"the body is not an image this service reads "
                             f"(send {ACCEPTED_LABEL})") from None
        raise InputError(413, "too_many_pixels", "the image declares too many pixels") from None
    except Exception:  # noqa: BLE001 - a malformed header can raise nearly anything inside Pillow
        raise InputError(415, "not_an_image", "the body is not a readable image") from None
    width, height = img.size
    if info is not None:
        info.update(format=img.format, mode=img.mode, width=width, height=height)
    _check_budget(img, data, max_pixels)
    short = min(width, height)
    if min_side and img.format == "JPEG" and short >= DRAFT_ABOVE * min_side:
        # draft() picks the smallest 1/2, 1/4 or 1/8 scale whose size is still >= the requested size.
        img.draft(img.mode, (-(-width * min_side // short), -(-height * min_side // short)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - truncated and corrupt streams surface as OSError, SyntaxError, ValueError...
        raise InputError(422, "corrupt_image", "the image is truncated or corrupt and could not be decoded") from None
    return _to_rgb(img)


def shades_of_gray(pixels: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades of Gray colour constancy on a uint8 HxWx3 array: each channel's illuminant estimate is the
    Minkowski p-mean of its values, and each channel is scaled so that the estimate becomes grey (the unit
    illuminant vector times sqrt(3)), keeping the image's overall level. A black image stays black."""
    x = pixels.astype(np.float32) / 255.0
    illuminant = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1.0 / p)
    illuminant = np.maximum(illuminant, 1.0 / 255)
    gain = np.linalg.norm(illuminant) / (np.sqrt(3.0) * illuminant)
    return np.clip(x * gain * 255.0 + 0.5, 0, 255).astype(np.uint8)


def resize_center_crop(img: Image.Image, resize_size: int, crop_h: int, crop_w: int | None = None,
                       colour_constancy: str = "none") -> torch.Tensor:
    """Resize the shorter side to resize_size (bilinear, antialiased), apply the colour constancy to the whole
    resized image, centre-crop; uint8 CHW tensor."""
    crop_w = crop_h if crop_w is None else crop_w
    w, h = img.size
    scale = resize_size / min(w, h)
    new_w, new_h = max(crop_w, round(w * scale)), max(crop_h, round(h * scale))
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - crop_w) // 2, (new_h - crop_h) // 2
    pixels = np.array(img, dtype=np.uint8)
    if colour_constancy == "shades_of_gray_p6":
        pixels = shades_of_gray(pixels, 6)
    elif colour_constancy != "none":
        raise ValueError(f"unknown colour constancy {colour_constancy!r}")
    pixels = np.ascontiguousarray(pixels[top:top + crop_h, left:left + crop_w])
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def normalize(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32, scaled to [0, 1] then standardised per channel."""
    x = images_uint8.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x - m) / s


def eval_uint8(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    return resize_center_crop(img, cfg.resize_size, cfg.crop_size, colour_constancy=cfg.colour_constancy)


def preprocess_bytes(data: bytes, cfg: PreprocessConfig, info: dict | None = None) -> torch.Tensor:
    """The whole chain for one image file: bytes -> normalised float CHW tensor (raises InputError)."""
    return normalize(eval_uint8(decode_image(data, cfg.max_pixels, info, cfg.resize_size), cfg), cfg.mean, cfg.std)
