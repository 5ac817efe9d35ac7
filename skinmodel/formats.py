"""What the service accepts as an image, decided from the raw bytes before any pixel is decoded.

Two users: the decoder (skinmodel/preprocessing.py) opens only these formats, and the page's gate
(stack/gate.py) recognises image bytes sent with a wrong Content-Type (curl --data-binary sends
application/x-www-form-urlencoded). Standard library only: the gate must not import torch.
"""
from __future__ import annotations

import re

# Pillow format name -> file signatures. The page promises exactly these five; everything else Pillow could
# open (JPEG 2000, AVIF, PSD, EPS through Ghostscript, ...) is refused before a decoder runs.
SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "BMP": (b"BM",),
    "WEBP": (b"RIFF",),  # + "WEBP" at offset 8, checked below
}
ACCEPTED_FORMATS = tuple(SIGNATURES)
ACCEPTED_LABEL = "JPEG, PNG, TIFF, BMP or WebP"
# A JSON body carries the image as base64 under one of these keys; "target" names the class to explain.
JSON_IMAGE_KEYS = ("data", "image", "b64", "image_base64", "file")
JSON_OPTION_KEYS = ("target",)

# libjpeg's standard progressive script writes 10 scans (6 for greyscale), cameras write 1. A file with more
# than this is built to make the decoder walk every block again and again (10,000 scans of a 6000x6000
# image cost a worker about a minute).
MAX_JPEG_SCANS = 32

_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI: no length field
# Inside entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), RST0-7 or 0xFF (fill); anything else
# is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def sniff(data: bytes) -> str | None:
    """The accepted format these bytes start with, or None."""
    for name, prefixes in SIGNATURES.items():
        if any(data.startswith(p) for p in prefixes):
            if name == "WEBP" and data[8:12] != b"WEBP":
                continue
            return name
    return None


def jpeg_scan_count(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """Start-of-scan segments of a JPEG stream, counted by walking the segment lengths (so bytes inside APPn
    or COM payloads, an EXIF thumbnail included, are never mistaken for markers). Stops counting once past
    stop_after. Junk where a marker should be is skipped up to the next 0xFF, as libjpeg does (it only warns):
    stopping there instead would let one stray byte hide every scan behind it."""
    n, pos, scans = len(data), 2, 0
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == 0xD9:  # end of image
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            break
        pos += 2 + length
        if marker == 0xDA:
            scans += 1
            if scans > stop_after:
                break
            nxt = _NEXT_MARKER.search(data, pos)
            if nxt is None:
                break
            pos = nxt.start()
    return scans
