"""Decoding with a budget: only the promised formats, pixel and decoded-byte caps, a JPEG scan cap, draft
decoding for photos far larger than the model input, bounded memory for high-bit-depth files."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from skinmodel.formats import MAX_JPEG_SCANS, jpeg_scan_count, sniff
from skinmodel.preprocessing import DEFAULT_MAX_PIXELS, InputError, PreprocessConfig, decode_image, preprocess_bytes
from stress import bombs
from stress.fuzz import png_with_declared_size

pytestmark = pytest.mark.fast

CFG = PreprocessConfig(96, 96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _refusal(data: bytes, **kw) -> InputError:
    with pytest.raises(InputError) as err:
        decode_image(data, **kw)
    return err.value


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP", "WEBP"])
def test_every_promised_format_is_sniffed_and_decoded(fmt):
    data = _save(Image.new("RGB", (32, 24), (10, 200, 30)), fmt)
    assert sniff(data) == fmt
    assert decode_image(data).size == (32, 24)


def test_a_riff_file_that_is_not_webp_is_not_an_image():
    assert sniff(b"RIFF\x10\x00\x00\x00WAVEfmt ") is None


@pytest.mark.parametrize("name", sorted(bombs.unpromised_formats()))
def test_formats_the_page_does_not_promise_are_refused_before_decoding(name):
    data = bombs.unpromised_formats()[name]
    err = _refusal(data)
    assert (err.status, err.code) == (415, "not_an_image")
    assert "JPEG, PNG, TIFF, BMP or WebP" in err.reason


def test_scan_count_of_baseline_and_progressive_jpegs():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    assert jpeg_scan_count(_save(img, "JPEG")) == 1
    assert 1 < jpeg_scan_count(_save(img, "JPEG", progressive=True)) <= MAX_JPEG_SCANS
    assert 1 < jpeg_scan_count(_save(img.convert("L"), "JPEG", progressive=True)) <= MAX_JPEG_SCANS


def test_marker_bytes_inside_metadata_are_not_counted_as_scans():
    """An EXIF block (thumbnails are JPEGs with their own scans) full of FF DA bytes changes nothing."""
    exif = Image.Exif()
    exif[0x9286] = b"ASCII\x00\x00\x00" + b"\xff\xda\x00\x08" * 200  # UserComment
    data = _save(Image.new("RGB", (40, 30), (1, 2, 3)), "JPEG", exif=exif.tobytes())
    assert data.count(b"\xff\xda") > 100
    assert jpeg_scan_count(data) == 1
    assert decode_image(data).size == (40, 30)


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused():
    bomb = bombs.progressive_scan_bomb(side=2000, scans=5000)
    assert len(bomb) < 2**20 and jpeg_scan_count(bomb, 10**9) == 5000
    err = _refusal(bomb)
    assert (err.status, err.code) == (422, "too_many_scans")


def test_pixel_and_decoded_byte_caps_are_checked_from_the_header():
    err = _refusal(png_with_declared_size(9000, 9000))
    assert (err.status, err.code) == (413, "too_many_pixels")
    # 35 MP is under the pixel cap, but as RGBA (4 bytes a pixel) it weighs more than 40 MP of RGB.
    assert 35_000_000 < DEFAULT_MAX_PIXELS
    rgba = bytearray(png_with_declared_size(7000, 5000))
    rgba[25] = 6  # colour type 6: RGBA
    import zlib

    rgba[29:33] = zlib.crc32(bytes(rgba[12:29])).to_bytes(4, "big")
    err = _refusal(bytes(rgba))
    assert (err.status, err.code) == (413, "too_many_pixels") and "mode RGBA" in err.reason


def test_large_jpegs_are_decoded_at_a_reduced_scale_with_the_same_result():
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (75, 100, 3), dtype=np.uint8)).resize(
        (3200, 2400), Image.BILINEAR)
    data = _save(big, "JPEG", quality=95)
    drafted = decode_image(data, min_side=CFG.resize_size)
    assert drafted.size == (400, 300)  # 1/8 scale: the smallest that keeps the shorter side >= 96 ... x 2 would not
    assert decode_image(data).size == (3200, 2400)
    full = preprocess_bytes(_save(big.resize((128, 96), Image.BILINEAR), "PNG"), CFG)
    fast = preprocess_bytes(data, CFG)
    assert float((full - fast).abs().mean()) < 0.05  # normalised units: the same picture
    small = _save(Image.new("RGB", (200, 150), (5, 6, 7)), "JPEG")
    assert decode_image(small, min_side=CFG.resize_size).size == (200, 150)  # HAM10000-sized: never drafted


def test_a_float_tiff_bomb_stays_within_a_bounded_amount_of_memory():
    """A few hundred KB of deflated float zeros decode to ~117 MB; converting them used to cost 1.2 GB more."""
    code = textwrap.dedent("""
        import resource, sys
        from skinmodel.preprocessing import PreprocessConfig, preprocess_bytes
        from stress.bombs import float_tiff
        data = float_tiff(5400)
        cfg = PreprocessConfig(96, 96, (0.5,) * 3, (0.2,) * 3)
        preprocess_bytes(float_tiff(64), cfg)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        preprocess_bytes(data, cfg)
        print(len(data), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    size, grew_mb = int(out[0]), int(out[1])
    assert size < 400_000
    assert grew_mb < 450, f"decoding a {size}-byte float TIFF grew the process by {grew_mb} MB"
