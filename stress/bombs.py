"""Hostile payloads that are cheap to send and expensive to receive, built here from nothing (no downloads).

Each one stood for a finding of the hostile-traffic review: a form-field bomb for TorchServe's Netty decoder,
a multipart part bomb, a progressive JPEG with thousands of scans, a 40 MP JPEG near the size cap, a float
TIFF that inflates in memory, formats the page never promised (JPEG 2000, PSD, EPS). stress/attacks.py sends
them to a running stack; tests use them to check each refusal.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from stack.settings import torchserve_config

# The service's body cap: the bombs are built to fit just under it, where they are most dangerous.
MAX_BODY = int(torchserve_config("max_request_size"))


def form_field_bomb(size: int = MAX_BODY - 1) -> bytes:
    """`a=&a=&...`: about 3.5 million empty fields in 10 MiB (url-encoded form body)."""
    return (b"a=&" * (size // 3 + 1))[:size]


def multipart_part_bomb(parts: int = 150_000, boundary: str = "b0undary") -> tuple[bytes, str]:
    """A multipart body of many empty fields (about 9 MiB for 150,000); returns (body, Content-Type)."""
    one = f'--{boundary}\r\nContent-Disposition: form-data; name="a"\r\n\r\n\r\n'.encode()
    return one * parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _segments(jpeg: bytes) -> list[tuple[int, int]]:
    """(start, end) of each marker segment of a JPEG, entropy-coded data included in its SOS segment."""
    from skinmodel.formats import _NEXT_MARKER  # the same marker grammar as the service's own scan counter

    out, pos = [], 2
    while pos < len(jpeg) - 1:
        marker = jpeg[pos + 1]
        if marker == 0xD9:
            break
        end = pos + 2 + int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            end = _NEXT_MARKER.search(jpeg, end).start()
        out.append((pos, end))
        pos = end
    return out


def progressive_scan_bomb(side: int = 6000, scans: int = 10_000) -> bytes:
    """A side x side progressive JPEG whose first AC scan is repeated until the file has `scans` scans.
    Each repeat is a few bytes (the image is flat, so the scan is one long end-of-band run) but makes the
    decoder walk every block again: the cost grows with side^2 x scans, the file barely grows."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (180, 120, 100)).save(buf, "JPEG", progressive=True, quality=90)
    jpeg = buf.getvalue()
    sos = [(a, b) for a, b in _segments(jpeg) if jpeg[a + 1] == 0xDA]
    start, end = sos[1]  # libjpeg's script: the DC scan first, then a luminance AC scan
    return jpeg[:end] + jpeg[start:end] * max(0, scans - len(sos)) + jpeg[end:]


def large_jpeg(megapixels: float = 40, max_bytes: int = MAX_BODY - 1, seed: int = 0) -> bytes:
    """A noisy 4:3 JPEG of about `megapixels` whose file size sits just under max_bytes."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(megapixels * 1e6 / width)
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (height // 4, width // 4, 3), dtype=np.uint8)).resize(
        (width, height), Image.BILINEAR)
    best = b""
    for quality in (40, 55, 65, 70, 75):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        if buf.tell() > max_bytes:
            break
        best = buf.getvalue()
    return best


def float_tiff(side: int = 5400) -> bytes:
    """A mode-F (32-bit float) TIFF of side x side zeros, deflate-compressed to a few hundred KB."""
    buf = io.BytesIO()
    Image.new("F", (side, side), 0.0).save(buf, "TIFF", compression="tiff_deflate")
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A real, fully decodable PNG of width x height black pixels (zlib shrinks it to a few KB per MP)."""
    row = b"\x00" + b"\x00" * (3 * width)
    raw = zlib.compress(row * height, 9)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def unpromised_formats() -> dict[str, bytes]:
    """Formats Pillow can open but the page does not list: each must be refused before decoding."""
    img = Image.new("RGB", (64, 48), (200, 100, 50))
    out = {}
    for fmt in ("JPEG2000", "PSD_like_GIF", "ICO", "PCX", "TGA", "PPM", "EPS_header", "GIF"):
        buf = io.BytesIO()
        if fmt == "EPS_header":  # never rendered: Ghostscript must not be reached
            out[fmt] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\nshowpage\n"
            continue
        if fmt == "PSD_like_GIF":
            out["PSD"] = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 48, 64, 8, 3) + b"\x00" * 64
            continue
        try:
            img.save(buf, fmt)
        except (KeyError, OSError):  # an encoder this Pillow build lacks
            continue
        out[fmt] = buf.getvalue()
    return out
