"""One preprocessing for training evaluation and serving: parity, conversions and refusals."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skinmodel.preprocessing import (COLOUR_BINS, COLOUR_STATISTICS, InputError, PreprocessConfig, colour_statistics,
                                    decode_image, normalize, preprocess_bytes, preprocess_bytes_and_colour)
from training.common import data as D

CFG = PreprocessConfig(96, 96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_training_eval_tensors_equal_handler_tensors(data_dir, sample_images):
    """The evaluation cache (training) and the handler's bytes->tensor path give identical tensors."""
    records = [r for r in D.load_records(data_dir) if r.path in {str(p) for p in sample_images}]
    cached = normalize(D.build_cache(records, "eval", CFG, None), CFG.mean, CFG.std)
    served = torch.stack([preprocess_bytes(open(r.path, "rb").read(), CFG) for r in records])
    assert cached.shape == (len(records), 3, 96, 96)
    assert torch.equal(cached, served)


def test_the_handler_builds_the_tensors_training_evaluated(data_dir, sample_images):
    """The handler's own preprocess() on request rows gives the evaluation cache's tensors, bit for bit."""
    from handler.skin_handler import SkinLesionHandler

    records = [r for r in D.load_records(data_dir) if r.path in {str(p) for p in sample_images}]
    cached = normalize(D.build_cache(records, "eval", CFG, None), CFG.mean, CFG.std)
    handler = SkinLesionHandler()
    handler.cfg = CFG
    (tensor, colour), slots = handler.preprocess([{"body": open(r.path, "rb").read()} for r in records])
    assert [slot for slot, _ in slots] == list(range(len(records)))
    assert torch.equal(tensor, cached)
    assert torch.equal(colour, D.colour_statistics_of(records, CFG))  # the colours the check was fitted on


def test_the_colour_statistics_keep_what_the_colour_constancy_takes_away(sample_images):
    """A lesion and the same lesion under a strong colour cast: after Shades of Gray the network's inputs are
    nearly the same, the colour statistics are not; the tensor beside them is preprocess_bytes' own."""
    cfg = PreprocessConfig(96, 96, CFG.mean, CFG.std, colour_constancy="shades_of_gray_p6")
    img = Image.open(sample_images[0]).convert("RGB")
    cast = Image.fromarray((np.asarray(img, dtype=np.float32) * [0.55, 0.8, 1.0]).round().astype(np.uint8))
    (x, c), (x_cast, c_cast) = (preprocess_bytes_and_colour(_encode(i), cfg) for i in (img, cast))
    assert torch.equal(x, preprocess_bytes(_encode(img), cfg)) and c.shape == (COLOUR_STATISTICS,)
    m, sd = torch.tensor(CFG.mean).view(3, 1, 1), torch.tensor(CFG.std).view(3, 1, 1)
    v, v_cast = x * sd + m, x_cast * sd + m  # back to [0, 1]: Shades of Gray keeps each picture's own level
    level = float((v * v_cast).sum() / (v * v).sum())
    assert (v_cast - level * v).abs().mean() < 2 / 255  # the same picture to two grey levels of rounding
    illuminant_shift = (c_cast[:3] - c[:3]).numpy()  # log illuminant: red moves by log 0.55, blue not at all
    assert illuminant_shift[0] == pytest.approx(np.log(0.55), abs=0.05) and abs(illuminant_shift[2]) < 0.02


@pytest.mark.fast
def test_colour_statistics_of_a_flat_picture():
    """(255, 128, 0) everywhere: illuminant and means are the colour, no spread, every pixel in one grid cell."""
    s = colour_statistics(np.full((30, 40, 3), (255, 128, 0), dtype=np.uint8))
    level = np.log(np.array([255, 128, 0]) / 255 + 1e-3)
    assert s[:3] == pytest.approx(level, abs=1e-5) and s[3:6] == pytest.approx(level, abs=1e-5)
    assert s[6:9] == pytest.approx([0, 0, 0], abs=1e-5)
    cell = (3 * COLOUR_BINS + 2) * COLOUR_BINS + 0  # red in the top bin, green (128/255) in bin 2, blue in bin 0
    expected = np.zeros(COLOUR_BINS ** 3)
    expected[cell] = 1.0
    assert s[9:] == pytest.approx(expected)


@pytest.mark.fast
@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_modes_are_converted_not_rejected(mode):
    base = Image.new("RGB", (40, 30), (200, 120, 80))
    if mode == "I;16":
        img = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
    else:
        img = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F", "YCbCr") else "PNG"
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "I;16":  # 16-bit scaled to 8 bits, not clipped to white
        assert abs(np.asarray(out)[0, 0, 0] - round(40000 / 65535 * 255)) <= 1


@pytest.mark.fast
def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert np.asarray(decode_image(_encode(img))).min() == 255


@pytest.mark.fast
def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 60)
    arr = np.asarray(out)
    assert arr[2, 10, 2] > 200 and arr[-3, 10, 0] > 200  # blue now on top, red at the bottom


@pytest.mark.parametrize("payload,status,code", [
    (b"", 400, "empty_body"),
    (b"this is plain text, renamed to lesion.jpg", 415, "not_an_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 415, "not_an_image"),
])
@pytest.mark.fast
def test_refusals_have_status_and_reason(payload, status, code):
    with pytest.raises(InputError) as err:
        decode_image(payload)
    assert (err.value.status, err.value.code) == (status, code)
    assert err.value.reason


def test_truncated_jpeg_is_refused(sample_images):
    data = sample_images[0].read_bytes()
    with pytest.raises(InputError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.status == 422 and err.value.code == "corrupt_image"


@pytest.mark.fast
def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch):
    """Refused with no pixel decoded: Pillow's load() (where every decoder runs) is never reached."""
    from PIL import ImageFile

    big = _encode(Image.new("1", (9000, 9000)))  # 81 MP, a few kB on disk
    assert len(big) < 100_000
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    with pytest.raises(InputError) as err:
        decode_image(big)
    assert err.value.status == 413 and "9000x9000" in err.value.reason
    assert loads == [], "pixels were decoded before the limit refused the image"
    decode_image(_encode(Image.new("RGB", (100, 100))))
    assert loads == [(100, 100)], "the probe does not see decoding"
    with pytest.raises(InputError):
        decode_image(_encode(Image.new("RGB", (100, 100))), max_pixels=5000)


@pytest.mark.fast
def test_meta_round_trip():
    assert PreprocessConfig.from_dict(CFG.to_dict()) == CFG
