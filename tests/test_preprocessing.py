"""One preprocessing for training evaluation and serving: parity, conversions and refusals."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skinmodel.preprocessing import InputError, PreprocessConfig, decode_image, normalize, preprocess_bytes
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
    tensor, slots = handler.preprocess([{"body": open(r.path, "rb").read()} for r in records])
    assert [slot for slot, _ in slots] == list(range(len(records)))
    assert torch.equal(tensor, cached)


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
