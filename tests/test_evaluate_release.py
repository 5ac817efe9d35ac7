"""python -m training evaluate-release (and its old spelling, evaluate --release): a labelled folder and an ISIC one-hot CSV of the same real images give
the numbers the serving handler's own answers give, and every bad input is a one-line error."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.common.data import CLASS_NAMES
from training.evaluation.subgroups import age_band

REPO = Path(__file__).resolve().parents[1]
ISIC = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, data_dir):
    """3 real images per class as <class>/ folders, and the same images listed in ISIC's one-hot format (with
    age and sex columns, as ISIC's metadata has them)."""
    root = tmp_path_factory.mktemp("labelled")
    rows = list(csv.DictReader(open(data_dir / "HAM10000_metadata.csv")))
    picked = [r for c in CLASS_NAMES for r in sorted((r for r in rows if r["dx"] == c), key=lambda r: r["image_id"])[:3]]
    for r in picked:
        (root / "folders" / r["dx"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(next(data_dir.rglob(f"{r['image_id']}.jpg")), root / "folders" / r["dx"])
    with open(root / "folders" / "ground_truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *ISIC, "age_approx", "sex"])
        for r in picked:
            w.writerow([r["image_id"], *("1.0" if r["dx"] == c.lower() else "0.0" for c in ISIC), r["age"], r["sex"]])
    return root, picked


def evaluate(*args, command: str = "evaluate-release"):
    return subprocess.run([sys.executable, "-m", "training", command, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def handler_answers(release, paths):
    from handler.skin_handler import SkinLesionHandler

    h = SkinLesionHandler.in_process(release)
    return [h.answer([Path(p).read_bytes()])[0] for p in paths]


def test_folder_and_one_hot_csv_give_the_handlers_numbers(labelled, tiny_release, tmp_path):
    root, picked = labelled
    r1 = evaluate("--release", tiny_release, "--data", root / "folders", "--out", tmp_path / "a", command="evaluate")
    r2 = evaluate("--release", tiny_release, "--data", root / "folders" / "ground_truth.csv", "--out", tmp_path / "b")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert a["refusals_as_misses"] == b["refusals_as_misses"] and a["per_class"] == b["per_class"]

    # The same images, one by one through the handler: accuracy and per-class recall computed here by hand.
    answers = handler_answers(tiny_release, [next((root / "folders" / r["dx"]).glob(r["image_id"] + ".*")) for r in picked])
    y = np.array([CLASS_NAMES.index(r["dx"]) for r in picked])
    pred = np.array([CLASS_NAMES.index(x["top"]["code"]) if x.get("top") else -1 for x in answers])
    assert b["images"] == len(picked) == 21
    assert b["refusals_as_misses"]["accuracy"] == pytest.approx(float((pred == y).mean()))
    for k, c in enumerate(CLASS_NAMES):
        assert b["per_class"][c]["recall"] == pytest.approx(float((pred[y == k] == k).mean())), c
    assert b["refusals_as_misses"]["balanced_accuracy"] == pytest.approx(
        np.mean([(pred[y == k] == k).mean() for k in range(7)]))
    verdicts = [x["verdict"] for x in answers]
    assert b["verdicts"] == {v: verdicts.count(v) for v in set(verdicts)}

    # ECE before the temperature, from the network's own logits (evaluate rebuilds it from served probabilities).
    import torch

    from skinmodel.networks import build_model, load_state_dict_file
    from skinmodel.preprocessing import preprocess_bytes
    from skinmodel.release import ReleaseMeta
    from training.release.calibrate import expected_calibration_error

    meta = ReleaseMeta.load(tiny_release)
    model = build_model(meta.arch, meta.num_classes)
    model.load_state_dict(load_state_dict_file(tiny_release / meta.weights_file))
    paths = [next((root / "folders" / r["dx"]).glob(r["image_id"] + ".*")) for r in picked]
    with torch.no_grad():
        logits = model.eval()(torch.stack([preprocess_bytes(p.read_bytes(), meta.preprocessing) for p in paths]))
    answered = torch.tensor([x["verdict"] != "not_dermoscopy" for x in answers])
    before, _ = expected_calibration_error(logits.softmax(1)[answered], torch.from_numpy(y)[answered])
    assert b["ece_before_temperature"] == pytest.approx(before, abs=2e-3)

    # Subgroups from the CSV's columns (the folders carry none), with the small-group flag.
    bands = {age_band(r["age"]) for r in picked}
    assert {g["group"] for g in b["subgroups"]["age band"]} == bands and "age band" not in a["subgroups"]
    assert all(not g["readable"] for g in b["subgroups"]["sex"])  # 21 images: every group under 30
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| refusals as misses |" in report and "too small to read" in report and "Skin type is not recorded" in report
    for png in ("confusion.png", "reliability.png"):
        assert (tmp_path / "b" / png).read_bytes()[:4] == b"\x89PNG"


def test_bad_labelled_sets_are_one_line_errors(labelled, tiny_release, tmp_path):
    root, picked = labelled
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "unknown label": ("image,label\n{0},melanoma\n", "unknown label 'melanoma'"),
        "missing file": ("image,label\nISIC_9999999,mel\n", "were not found"),
        "class missing": ("image,label\n" + "".join(f"{r['image_id']},{r['dx']}\n" for r in picked if r["dx"] != "df"),
                          "no image of class df"),
        "no label column": ("image,diagnosis\n{0},mel\n", "needs an image column"),
        "two ones": ("image," + ",".join(ISIC) + "\n{0},1,1,0,0,0,0,0\n", "exactly one class column must be 1"),
    }
    for name, (text, message) in cases.items():
        f = root / "folders" / f"{name.replace(' ', '_')}.csv"  # beside the images, so they resolve
        f.write_text(text.format(picked[0]["image_id"]))
        r = evaluate("--release", tiny_release, "--data", f, "--out", bad / name)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr[-1500:])
        f.unlink()
    (bad / "melanoma").mkdir()
    r = evaluate("--release", tiny_release, "--data", bad, "--out", bad / "x")
    assert r.returncode == 1 and "unknown folder(s) melanoma" in r.stderr, r.stderr[-1500:]
    r = evaluate("--release", tiny_release, "--out", bad / "x")
    assert r.returncode == 1 and "--release needs --data" in r.stderr
