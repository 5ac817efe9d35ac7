"""The one preprocessing definition of the project.

Training's evaluation, the TorchServe handler and the benchmarks all import this module, so the
tensor a served image turns into is, bit for bit, the tensor the test metrics were computed on.
The chain is: bytes -> decode (container layout, format, size, aspect ratio, metadata size and JPEG scans
checked from the header first) -> EXIF orientation (tag 0x0112 alone) -> RGB -> resize shorter side -> colour
constancy (when the release has one) -> centre crop -> uint8 CHW -> float, normalised. Beside it, for the
dermoscopy check: the colour statistics of the resized picture before the colour constancy.

Decoding has a budget that no accepted file can exceed, so its cost is bounded by the decoded image, not by
how the file is built: the five formats the page lists; a pixel count, a decoded-bytes count and an aspect
ratio checked before any pixel is decoded; chunk, segment, tag and metadata limits (skinmodel/formats.py)
checked before Pillow walks the file; at most MAX_JPEG_SCANS scans and JPEGs (MPO included) far larger than
the model input decoded at a reduced DCT scale (Pillow's draft mode) instead of in full; no run-length BMP
(Pillow decodes it in pure Python). The worker adds a CPU budget per image (skinmodel.inputs.cpu_budget).

"""
from __future__ import annotations

import io
import re
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageMode, JpegImagePlugin, MpoImagePlugin, UnidentifiedImageError

from skinmodel.formats import (ACCEPTED_FORMATS, ACCEPTED_LABEL, MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS,
                               MAX_METADATA_BYTES, jpeg_layout, layout_problem)
from skinmodel.inputs import DEFAULT_MAX_PIXELS, InputError, PreprocessConfig

__all__ = ["COLOUR_LAYOUT", "COLOUR_STATISTICS", "DEFAULT_MAX_PIXELS", "InputError", "PreprocessConfig",
           "colour_statistics", "decode_image", "eval_uint8", "normalize", "preprocess_bytes",
           "preprocess_bytes_and_colour",
           "resize_center_crop", "shades_of_gray"]

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
# The longer side may be at most this many times the shorter: resizing the shorter side to the model's size
# then makes at most MAX_ASPECT_RATIO x resize_size^2 pixels (a 400000x1 PNG asked for 96 x 38 M before).
MAX_ASPECT_RATIO = 10
# Pillow's JPEG opener returns an MpoImageFile (format "MPO") when an APP2 "MPF" segment is present; both are
# the same libjpeg stream, so the scan cap and draft decoding apply to the class, not the format name.
_JPEG_FAMILY = JpegImagePlugin.JpegImageFile
_FORMAT_NAMES = {*ACCEPTED_FORMATS, MpoImagePlugin.MpoImageFile.format}
_BMP_RLE = {1, 2}  # BI_RLE8, BI_RLE4: decoded by Pillow in pure Python, one byte at a time
# Where an orientation can come from; each is read by Python code, so each is capped (hex text doubles it).
_ORIENTATION_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_EXIF_INTEGER = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}  # TIFF field types of one integer
_XMP_ORIENTATION = re.compile(r'tiff:Orientation(="|>)([0-9])')
# The dermoscopy check reads the picture's colours before the colour constancy: 9 channel statistics and the
# shares of a COLOUR_BINS^3 RGB grid (colour_statistics).
COLOUR_BINS = 4
COLOUR_STATISTICS = 9 + COLOUR_BINS ** 3
# The name of colour_statistics' layout: a check fitted on one layout is refused by a handler computing another
# (skinmodel.networks.validate_check_statistics). Change it whenever colour_statistics changes what a column means.
COLOUR_LAYOUT = f"log-sog6-illuminant-3,log-mean-3,std-3,sqrt-rgb-grid-{COLOUR_BINS}^3"
Image.init()  # every plugin imported now, never half-way under a decoding budget's timer


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
    if img.format not in _FORMAT_NAMES:
        raise InputError(415, "not_an_image", f"the body is not an image this service reads (send {ACCEPTED_LABEL})")
    if img.format == "BMP" and img.info.get("compression") in _BMP_RLE:
        raise InputError(415, "unsupported_compression", "run-length encoded BMP files are not read; "
                         "send the image as PNG or JPEG")
    if width <= 0 or height <= 0:
        raise InputError(422, "bad_dimensions", f"the image declares a size of {width}x{height}")
    if width * height > max_pixels:
        raise InputError(413, "too_many_pixels",
                         f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if _decoded_bytes(img) > BYTES_PER_ALLOWED_PIXEL * max_pixels:
        raise InputError(413, "too_many_pixels", f"a {width}x{height} image in mode {img.mode} decodes to "
                         f"{_decoded_bytes(img)} bytes; the limit is {BYTES_PER_ALLOWED_PIXEL * max_pixels}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(422, "extreme_aspect_ratio", f"the image is {width}x{height}; its longer side may be at "
                         f"most {MAX_ASPECT_RATIO} times its shorter side (crop it to the lesion)")
    if isinstance(img, _JPEG_FAMILY):
        scans, segments = jpeg_layout(data)
        if scans > MAX_JPEG_SCANS:
            raise InputError(422, "too_many_scans", f"the JPEG has more than {MAX_JPEG_SCANS} progressive scans; "
                             "no camera or common encoder writes that many (re-save it as a baseline JPEG)")
        if segments > MAX_JPEG_SEGMENTS:
            raise InputError(422, "bloated_file", f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments")
    _check_metadata(img)


def _check_metadata(img: Image.Image) -> None:
    """Metadata the orientation is read from stays small (PNG chunks after the image data are only seen after
    loading, so this runs again then)."""
    for key in _ORIENTATION_SOURCES:
        value = img.info.get(key)
        if isinstance(value, (bytes, str)) and len(value) > 2 * MAX_METADATA_BYTES + 64:
            raise InputError(422, "bloated_file", f"the image's {key!r} metadata is {len(value)} bytes; "
                             f"the limit is {MAX_METADATA_BYTES} (re-save it without metadata)")


def _ifd0_orientation(blob: bytes) -> int | None:
    """Tag 0x0112 of an EXIF block's first directory, read alone (no other tag is parsed)."""
    if blob.startswith(b"Exif\x00\x00"):
        blob = blob[6:]
    if blob[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    end = "<" if blob[:1] == b"I" else ">"
    try:
        (ifd,) = struct.unpack_from(end + "I", blob, 4)
        (count,) = struct.unpack_from(end + "H", blob, ifd)
        for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(blob) - 11), 12):
            tag, kind, n = struct.unpack_from(end + "HHI", blob, entry)
            if tag == 0x0112:
                return struct.unpack_from(end + _EXIF_INTEGER[kind], blob, entry + 8)[0] if (
                    n == 1 and kind in _EXIF_INTEGER) else None
    except struct.error:
        return None
    return None


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1-8) as Pillow's getexif() finds it -- the TIFF's own first directory, the EXIF block,
    PNG's hex 'Raw profile type exif', then XMP's tiff:Orientation -- without parsing any other tag. (Pillow
    itself turns a TIFF upright while loading it and drops the tag, within the IFD limits of formats.py.)"""
    info, value = img.info, None
    if isinstance(info.get("exif"), bytes):
        value = _ifd0_orientation(info["exif"])
    elif isinstance(info.get("Raw profile type exif"), str):
        try:
            value = _ifd0_orientation(bytes.fromhex("".join(info["Raw profile type exif"].split("\n")[3:])))
        except ValueError:
            value = None
    elif hasattr(img, "tag_v2"):
        value = img.tag_v2.get(0x0112)
    if value is None:
        xmp = info.get("XML:com.adobe.xmp") or info.get("xmp")
        if isinstance(xmp, bytes):
            xmp = xmp.decode("utf-8", "replace")
        found = _XMP_ORIENTATION.search(xmp) if isinstance(xmp, str) else None
        value = int(found[2]) if found else None
    return value if isinstance(value, int) else 1


def _open(data: bytes) -> Image.Image:
    problem = layout_problem(data)  # before Pillow walks the file's chunks, segments or tags in Python
    if problem:
        raise InputError(422, "bloated_file", f"the file is built to cost more than its pixels: {problem} "
                         "(re-save the image without extra metadata)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise InputError(415, "not_an_image", f"the body is not an image this service reads "
                             f"(send {ACCEPTED_LABEL})") from None
        raise InputError(413, "too_many_pixels", "the image declares too many pixels") from None
    except Exception:  # noqa: BLE001 - a malformed header can raise nearly anything inside Pillow
        raise InputError(415, "not_an_image", "the body is not a readable image") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, info: dict | None = None,
                 min_side: int | None = None) -> Image.Image:
    """Bytes -> upright RGB PIL image, or InputError. Container layout, format, pixel count, aspect ratio,
    decoded size, metadata size and JPEG scans are checked before decoding. With min_side, a JPEG whose shorter
    side is DRAFT_ABOVE times min_side or more is decoded at the smallest DCT scale that keeps its shorter
    side >= min_side. If `info` is given it receives the file's format, mode and size (for the audit log)."""
    if data is None or len(data) == 0:
        raise InputError(400, "empty_body", "the request body is empty; send an image file")
    img = _open(data)
    width, height = img.size
    if info is not None:
        info.update(format=img.format, mode=img.mode, width=width, height=height)
    _check_budget(img, data, max_pixels)
    short = min(width, height)
    if min_side and isinstance(img, _JPEG_FAMILY) and short >= DRAFT_ABOVE * min_side:
        # draft() picks the smallest 1/2, 1/4 or 1/8 scale whose size is still >= the requested size.
        img.draft(img.mode, (-(-width * min_side // short), -(-height * min_side // short)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception:  # noqa: BLE001 - truncated and corrupt streams surface as OSError, SyntaxError, ValueError...
        raise InputError(422, "corrupt_image", "the image is truncated or corrupt and could not be decoded") from None
    _check_metadata(img)
    method = _TRANSPOSE.get(_orientation(img))
    return _to_rgb(img.transpose(method) if method is not None else img)


def shades_of_gray(pixels: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades of Gray colour constancy on a uint8 HxWx3 array: each channel's illuminant estimate is the
    Minkowski p-mean of its values, and each channel is scaled so that the estimate becomes grey (the unit
    illuminant vector times sqrt(3)), keeping the image's overall level. A black image stays black."""
    x = pixels.astype(np.float32) / 255.0
    illuminant = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1.0 / p)
    illuminant = np.maximum(illuminant, 1.0 / 255)
    gain = np.linalg.norm(illuminant) / (np.sqrt(3.0) * illuminant)
    return np.clip(x * gain * 255.0 + 0.5, 0, 255).astype(np.uint8)


def colour_statistics(pixels: np.ndarray) -> np.ndarray:
    """The colours of a uint8 HxWx3 picture as the dermoscopy check reads them, taken before the colour constancy
    (which removes them from what the network sees): the logs of its Shades of Gray illuminant estimate (p = 6) and
    of its channel means, its channel standard deviations, and the square root of its share of pixels in each cell
    of a COLOUR_BINS^3 RGB grid. COLOUR_STATISTICS float32 numbers."""
    x = pixels.reshape(-1, 3).astype(np.float32) / 255.0
    illuminant = np.power(np.mean(np.power(x, 6), axis=0), 1.0 / 6)
    cells = np.minimum((x * COLOUR_BINS).astype(np.int64), COLOUR_BINS - 1)
    index = (cells[:, 0] * COLOUR_BINS + cells[:, 1]) * COLOUR_BINS + cells[:, 2]
    shares = np.bincount(index, minlength=COLOUR_BINS ** 3) / max(len(x), 1)
    return np.concatenate([np.log(illuminant + 1e-3), np.log(x.mean(0) + 1e-3), x.std(0),
                           np.sqrt(shares)]).astype(np.float32)


def _resized(img: Image.Image, resize_size: int, crop_h: int, crop_w: int) -> np.ndarray:
    """The shorter side resized to resize_size (bilinear, antialiased), never below the crop: uint8 HxWx3."""
    w, h = img.size
    scale = resize_size / min(w, h)
    new_w, new_h = max(crop_w, round(w * scale)), max(crop_h, round(h * scale))
    return np.array(img.resize((new_w, new_h), Image.BILINEAR), dtype=np.uint8)


def _constant_crop(pixels: np.ndarray, crop_h: int, crop_w: int, colour_constancy: str) -> torch.Tensor:
    """The colour constancy on the whole resized picture, then the centre crop: uint8 CHW tensor."""
    new_h, new_w = pixels.shape[:2]
    left, top = (new_w - crop_w) // 2, (new_h - crop_h) // 2
    if colour_constancy == "shades_of_gray_p6":
        pixels = shades_of_gray(pixels, 6)
    elif colour_constancy != "none":
        raise ValueError(f"unknown colour constancy {colour_constancy!r}")
    pixels = np.ascontiguousarray(pixels[top:top + crop_h, left:left + crop_w])
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def resize_center_crop(img: Image.Image, resize_size: int, crop_h: int, crop_w: int | None = None,
                       colour_constancy: str = "none") -> torch.Tensor:
    """Resize the shorter side to resize_size (bilinear, antialiased), apply the colour constancy to the whole
    resized image, centre-crop; uint8 CHW tensor."""
    crop_w = crop_h if crop_w is None else crop_w
    return _constant_crop(_resized(img, resize_size, crop_h, crop_w), crop_h, crop_w, colour_constancy)


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


def preprocess_bytes_and_colour(data: bytes, cfg: PreprocessConfig,
                                info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """preprocess_bytes' tensor and, from the same decoding, the picture's colour_statistics before the colour
    constancy: what the handler gives the network and the dermoscopy check."""
    pixels = _resized(decode_image(data, cfg.max_pixels, info, cfg.resize_size), cfg.resize_size, cfg.crop_size,
                      cfg.crop_size)
    tensor = _constant_crop(pixels, cfg.crop_size, cfg.crop_size, cfg.colour_constancy)
    return normalize(tensor, cfg.mean, cfg.std), torch.from_numpy(colour_statistics(pixels))
