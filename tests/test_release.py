"""The committed release model: its files agree with each other, with the data, and with what the handler does."""
from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest
import torch

from handler.skin_handler import SkinLesionHandler
from training import data as D

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "release"


@pytest.fixture(scope="module")
def meta():
    path = RELEASE / "meta.json"
    if not path.exists():
        pytest.fail("release/meta.json is missing: the release model must be committed")
    return json.loads(path.read_text())


def test_meta_reads_and_writes_back_unchanged(meta, tmp_path):
    from skinmodel.release import ReleaseMeta

    for folder in (RELEASE, RELEASE / "int8"):
        saved = ReleaseMeta.load(folder).save(tmp_path / "meta.json")
        assert json.loads(saved.read_text()) == json.loads((folder / "meta.json").read_text()), folder


def test_meta_matches_weights_classes_and_split(meta, data_dir):
    weights = RELEASE / meta["weights_file"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["weights_sha256"]
    assert weights.stat().st_size < 25 * 2**20
    assert meta["class_names"] == list(D.CLASS_NAMES)
    seed = meta["training"]["args"]["split_seed"]
    split = D.load_split(D.DataConfig(data=str(data_dir), split_seed=seed))
    assert split.hash == meta["split_hash"], \
        "the release was evaluated on another split than the lesion-grouped one this code makes"
    test = meta["metrics"]["test"]
    assert 0 < test["balanced_accuracy"] <= 1 and meta["temperature"] > 0
    for name in ("report.md", "results.json", "model_card.md", "reliability.png", "ood_stats.pt"):
        assert (RELEASE / name).exists(), name
    card = (RELEASE / "model_card.md").read_text()
    assert f"{test['balanced_accuracy']:.3f}" in card and f"{meta['calibration']['test_ece_after']:.3f}" in card
    assert "Out-of-scope use" in card and "lesion_id" in card


@pytest.fixture(scope="module")
def handler(meta):
    h = SkinLesionHandler()
    context = types.SimpleNamespace(system_properties={"model_dir": str(RELEASE)}, manifest={"model": {}})
    h.initialize(context)
    return h


def answer(handler, payload: bytes) -> dict:
    return handler.postprocess(handler.inference(handler.preprocess([{"body": payload}])))[0]


def test_real_lesions_are_not_refused(handler, data_dir, meta):
    records = [r for r in D.split_records(D.load_records(data_dir), 0) if r.split == "test"][:40]
    verdicts = [answer(handler, open(r.path, "rb").read())["verdict"] for r in records]
    refused = verdicts.count("not_dermoscopy") / len(verdicts)
    assert refused <= max(0.15, 2 * meta["abstention"]["test_lesions_rejected_as_ood"]), verdicts


def test_non_skin_images_are_refused(handler):
    import skimage

    data = Path(skimage.__file__).parent / "data"
    for name in ("chelsea.png", "astronaut.png", "coffee.png"):
        a = answer(handler, (data / name).read_bytes())
        assert a["verdict"] != "ok", (name, a["verdict"], a["top"])
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(buf, "PNG")
    assert answer(handler, buf.getvalue())["verdict"] == "not_dermoscopy"


def test_served_probabilities_are_the_calibrated_ones(handler, sample_images, meta):
    from skinmodel.networks import build_model, load_state_dict_file
    from skinmodel.preprocessing import PreprocessConfig, preprocess_bytes

    model = build_model(meta["arch"], meta["num_classes"])
    model.load_state_dict(load_state_dict_file(RELEASE / meta["weights_file"]))
    model.eval()
    x = preprocess_bytes(sample_images[0].read_bytes(), PreprocessConfig.from_dict(meta["preprocessing"]))[None]
    with torch.no_grad():
        expected = torch.softmax(model(x) / meta["temperature"], 1)[0]
    got = {p["code"]: p["probability"] for p in answer(handler, sample_images[0].read_bytes())["predictions"]}
    for code, p in zip(meta["class_names"], expected.tolist()):
        assert abs(got[code] - p) < 1e-4
