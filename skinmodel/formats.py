"""What the service accepts as an image, decided from the raw bytes before any pixel is decoded.

Two users: the decoder (skinmodel/preprocessing.py) opens only these formats, and the page's gate
(stack/gate.py) recognises image bytes sent with a wrong Content-Type (curl --data-binary sends
application/x-www-form-urlencoded). Standard library only: the gate must not import torch.
"""
from __future__ import annotations

import re
import struct

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

# A JPEG's own header and scan segments are a few dozen (APPn, DQT, DHT, SOF, SOS; a few hundred at most with a
# large ICC profile split into APP2 segments); every one costs the decoder a step of Python.
MAX_JPEG_SEGMENTS = 1024
# Metadata the decoder reads in Python (EXIF, XMP, text): at most one JPEG APP segment's worth per chunk or tag
# (64 KB), and so many chunks (text ones fewer); an ICC profile (copied, never parsed) up to 1 MB. A PNG or WebP file
# has at most MAX_CHUNKS chunks (libpng's 8 KB image-data chunks make a 10 MiB PNG 1,280), a TIFF's first directory
# at most MAX_TIFF_TAGS tags (cameras write 20-60), and a TIFF lists no more strips or tiles than its pixels need.
MAX_METADATA_BYTES = 64 * 1024
MAX_ICC_BYTES = 2**20
MAX_METADATA_CHUNKS = 32
MAX_TEXT_CHUNKS = 16  # PNG text: Pillow inflates each zTXt/iTXt to up to 1 MB (3 ms of CPU apiece)
MAX_CHUNKS = 10_000
MAX_TIFF_TAGS = 1024
# Pillow decodes an uncompressed TIFF one strip or tile at a time in a Python loop (~10 us each): 40 MP in 16x16
# tiles cost 1.5 s. Encoders write strips of ~8 KB (a 10 MiB body holds ~1,300) or tiles of 256x256.
MAX_TIFF_PIECES = 16_384
_PNG_FRAME_CHUNKS = {b"acTL", b"fcTL", b"fdAT"}  # APNG: frames, not metadata (only the first image is read)
_PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt"}
_TIFF_TABLES = (273, 279, 324, 325)  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
_TIFF_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
_FILL = re.compile(rb"\xff+")

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


def jpeg_layout(data: bytes, max_scans: int = MAX_JPEG_SCANS, max_segments: float = MAX_JPEG_SEGMENTS
                ) -> tuple[int, int]:
    """(start-of-scan segments, marker segments) of a JPEG stream up to its first end-of-image (an MPO's first
    frame); a junk or fill byte between segments counts as a segment (Pillow's parser steps over each). Counted by
    walking the segment lengths (so bytes inside APPn or COM payloads, an EXIF thumbnail included, are never
    mistaken for markers). Stops once past max_scans or max_segments, so its own cost is bounded. Junk where a
    marker should be is skipped up to the next 0xFF, as libjpeg does (it only warns): stopping there instead would
    let one stray byte hide every scan behind it."""
    n, pos, scans, segments = len(data), 2, 0, 0
    while pos + 4 <= n and scans <= max_scans and segments <= max_segments:
        if data[pos] != 0xFF:
            nxt = data.find(b"\xff", pos)
            if nxt < 0:
                break
            segments += nxt - pos  # junk: Pillow's header parser steps over it byte by byte, as over a segment
            pos = nxt
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes before a marker: skipped at once here, one by one by Pillow
            nxt = _FILL.match(data, pos).end() - 1
            segments += nxt - pos
            pos = nxt
            continue
        segments += 1
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
            nxt = _NEXT_MARKER.search(data, pos)
            if nxt is None:
                break
            pos = nxt.start()
    return scans, segments


def jpeg_scan_count(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """Start-of-scan segments of a JPEG stream (see jpeg_layout); stops counting once past stop_after."""
    return jpeg_layout(data, stop_after, float("inf"))[0]


def _png_layout(data: bytes) -> str | None:
    pos, n, chunks, metadata, text = 8, len(data), 0, 0, 0
    while pos + 8 <= n:
        length, tag = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        chunks += 1
        if chunks > MAX_CHUNKS:
            return f"the PNG has more than {MAX_CHUNKS} chunks"
        if tag == b"IEND":
            break
        if tag[0] & 0x20 and tag not in _PNG_FRAME_CHUNKS:  # ancillary: metadata
            metadata += 1
            cap = MAX_ICC_BYTES if tag == b"iCCP" else MAX_METADATA_BYTES
            if length > cap:
                return f"its {tag.decode('latin-1')!r} chunk is {length} bytes; the limit is {cap}"
            text += tag in _PNG_TEXT_CHUNKS
            if metadata > MAX_METADATA_CHUNKS or text > MAX_TEXT_CHUNKS:
                return f"the PNG has more than {MAX_METADATA_CHUNKS} metadata or {MAX_TEXT_CHUNKS} text chunks"
        pos += 12 + length
    return None


def _webp_layout(data: bytes) -> str | None:
    pos, n, chunks = 12, len(data), 0
    while pos + 8 <= n:
        tag, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        chunks += 1
        if chunks > MAX_CHUNKS:
            return f"the WebP file has more than {MAX_CHUNKS} chunks"
        cap = {b"EXIF": MAX_METADATA_BYTES, b"XMP ": MAX_METADATA_BYTES, b"ICCP": MAX_ICC_BYTES}.get(tag)
        if cap is not None and length > cap:
            return f"its {tag.decode('latin-1').strip()} chunk is {length} bytes; the limit is {cap}"
        pos += 8 + length + (length & 1)
    return None


def _tiff_layout(data: bytes) -> str | None:
    """The first IFD (the only one decoded): its tag count, the size of its metadata tags, and strip or tile
    tables no longer than the image's own strips or tiles."""
    end = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(end + "I", data, 4)
    if ifd + 2 > len(data):
        return None  # Pillow refuses it as unreadable
    (count,) = struct.unpack_from(end + "H", data, ifd)
    if count > MAX_TIFF_TAGS:
        return f"its first directory has {count} tags; the limit is {MAX_TIFF_TAGS}"
    tags = {}
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(data) - 11), 12):
        tag, typ, n, raw = struct.unpack_from(end + "HHI4s", data, entry)
        tags[tag] = n, struct.unpack(end + ("H" if typ == 3 else "I"), raw[:2 if typ == 3 else 4])[0]
        size = n * _TIFF_UNIT.get(typ, 1)
        cap = MAX_METADATA_BYTES if tag == 700 else MAX_ICC_BYTES  # XMP is searched for an orientation
        if tag not in _TIFF_TABLES and size > cap:
            return f"its tag {tag} holds {size} bytes; the limit is {cap}"
    width, height = tags.get(256, (0, 0))[1], tags.get(257, (0, 0))[1]
    tile_w, tile_h = tags.get(322, (0, width))[1], tags.get(323, (0, tags.get(278, (0, height))[1]))[1]
    pieces = -(-width // max(1, tile_w)) * -(-height // max(1, tile_h))
    if tags.get(284, (0, 1))[1] == 2:  # planar: one table entry per band
        pieces *= tags.get(277, (0, 1))[1]
    if pieces > MAX_TIFF_PIECES:
        return f"it is cut into {pieces} strips or tiles; the limit is {MAX_TIFF_PIECES}"
    # JPEG-compressed strips (6, 7): libtiff allows 100 scans each; hold them to the JPEG limit (entropy-coded
    # data never contains FF DA, so counting it in the whole file is an upper bound of the scans).
    if tags.get(259, (0, 1))[1] in (6, 7) and data.count(b"\xff\xda") > MAX_JPEG_SCANS * max(1, pieces):
        return f"its JPEG-compressed strips or tiles hold more than {MAX_JPEG_SCANS} scans each"
    for tag in _TIFF_TABLES:
        if tags.get(tag, (0, 0))[0] > max(1, pieces):
            return f"it lists {tags[tag][0]} strips or tiles for {width}x{height} pixels (at most {pieces})"
    return None


def layout_problem(data: bytes) -> str | None:
    """Why the container of an accepted image is built to cost more than its pixels (more chunks, segments or
    tags, or bigger metadata, than the limits above), or None. Its own work is bounded by those limits."""
    fmt = sniff(data)
    try:
        if fmt == "JPEG":
            return (f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments"
                    if jpeg_layout(data)[1] > MAX_JPEG_SEGMENTS else None)
        walk = {"PNG": _png_layout, "WEBP": _webp_layout, "TIFF": _tiff_layout}.get(fmt)
        return walk(data) if walk else None
    except struct.error:  # a table cut short: the decoder refuses it as truncated
        return None
