"""The int8 export loads through the same handler and answers like the fp32 model it came from."""
from __future__ import annotations

import json
import types

from handler.skin_handler import SkinLesionHandler
from tests.conftest import run_training


def _handler(model_dir):
    h = SkinLesionHandler()
    h.initialize(types.SimpleNamespace(system_properties={"model_dir": str(model_dir)}, manifest={"model": {}}))
    return h


def test_int8_export_is_served_by_the_handler(tiny_release, tmp_path, data_dir, sample_images):
    out = tmp_path / "int8"
    r = run_training("quantize", "--release", str(tiny_release), "--out", str(out), "--limit-per-class", "8",
                     "--calibration-images", "32", "--cache-dir", str(tmp_path / "cache"), "--data", str(data_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    comparison = json.loads((out / "int8_comparison.json").read_text())
    assert meta["arch"] == "resnet18_int8" and meta["weights_dtype"] == "int8"
    assert comparison["rows"]["int8"]["file_mb"] < comparison["rows"]["fp32"]["file_mb"] / 1.8
    h8, h32 = _handler(out), _handler(tiny_release)
    payload = sample_images[0].read_bytes()
    a8 = h8.postprocess(h8.inference(h8.preprocess([{"body": payload}])))[0]
    a32 = h32.postprocess(h32.inference(h32.preprocess([{"body": payload}])))[0]
    assert len(a8["predictions"]) == 7 and abs(sum(p["probability"] for p in a8["predictions"]) - 1) < 1e-3
    p8 = {p["code"]: p["probability"] for p in a8["predictions"]}
    p32 = {p["code"]: p["probability"] for p in a32["predictions"]}
    assert max(abs(p8[c] - p32[c]) for c in p8) < 0.1, "int8 strays far from the fp32 model it quantizes"
    assert a8["predictions"][0]["code"] == a32["predictions"][0]["code"]
    rows = comparison["rows"]
    assert abs(rows["int8"]["accuracy"] - rows["fp32"]["accuracy"]) < 0.2, rows
