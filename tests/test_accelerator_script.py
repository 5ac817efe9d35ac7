"""training/accelerator.sh in --quick mode on the CPU: the whole study inside a budget, packed into at most 8 files
of < 16 MiB, and `python -m training unpack` turning them back into a release the handler serves."""
from __future__ import annotations

import json
import shlex

import pytest
import torch

from tests import background
from tests.conftest import run_training


@pytest.fixture(scope="module")
def packed(data_dir):
    """(work folder, out folder) of `training/accelerator.sh --quick --teacher-tta --recipe-search --budget 120
    --after-training 60`, run in the background while the other tests run (tests/background.py)."""
    work = background.result("accelerator study")
    return work, work / "out"


def test_the_run_leaves_few_small_files_with_a_manifest(packed):
    _, out = packed
    files = sorted(p for p in out.iterdir())
    assert all(p.is_file() for p in files) and len(files) <= 8
    assert all(p.stat().st_size < 16 * 2**20 for p in files)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p["name"] for p in manifest["parts"]} | {"manifest.json", "study.log"} == {p.name for p in files}
    assert len(manifest["parts"]) >= 2, "fp16 ResNet18 weights (~22 MB) must have been cut into parts"
    log = (out / "study.log").read_text()
    assert "accelerator study on cpu" in log
    assert "training done; the steps after it did not end" in log, "the student was not sent back early"
    # every run measured itself; the budgeted ones ran at least the two epochs the sizing needs, at most the cap
    assert {"resnet18", "resnet50", "resnet18_kd"} <= set(manifest["runs"])
    assert all(2 <= manifest["runs"][r]["epochs"] <= 3 for r in ("resnet18", "resnet18_kd"))
    assert all(r["images_per_s"] > 0 for r in manifest["runs"].values())
    assert manifest["test"]["resnet18 distilled"]["balanced_accuracy"] >= 0 and manifest["version"] == "2.0"


def test_teacher_candidates_include_their_test_time_augmented_views(packed):
    work, _ = packed
    teacher = json.loads((work / "study" / "teacher.json").read_text())
    assert {"resnet18", "resnet18 + TTA", "resnet18+resnet50 + TTA"} <= set(teacher["candidates"])
    assert teacher["tta"] == teacher["chosen"].endswith(" + TTA")
    kd_args = json.loads((work / "study" / "resnet18_kd" / "args.json").read_text())
    assert kd_args["teacher_tta"] == teacher["tta"] and kd_args["teacher"] == teacher["checkpoints"]


def test_the_recipe_is_chosen_on_validation_and_every_later_run_uses_it(packed):
    """Stage by stage, the winner is the best validation score among the runs that beat always-nv, every run of
    the next stage carries it, and every later network trains with the final choice."""
    work, _ = packed
    recipe = json.loads((work / "study" / "recipe" / "recipe.json").read_text())
    stages = {}
    for row in recipe["runs"]:
        stages.setdefault(row["stage"], []).append(row)
    assert list(stages) == ["img_size", "colour_constancy", "ema", "class_weighting x mix"]
    winners = []
    for rows in stages.values():
        eligible = [r for r in rows if r["accuracy"] > recipe["accuracy_floor"]] or rows
        winners.append(max(eligible, key=lambda r: r["score"]))
        for r in rows:
            assert r["score"] == pytest.approx((r["plain"] + r["colour temperature"] + r["brightness"]) / 3)
    keys = list(recipe["chosen"])
    for winner, later in zip(winners, list(stages.values())[1:]):
        stage_keys = [k for k in keys if any(r[k] != later[0][k] for r in later)]  # what the later stage varies
        assert all({k: r[k] for k in keys if k not in stage_keys} == {k: winner[k] for k in keys if k not in stage_keys}
                   for r in later), "a stage did not carry the previous stage's winner"
    assert {k: winners[-1][k] for k in keys} == recipe["chosen"]
    for run in ("resnet18", "resnet50", "resnet18_kd", "grid/a0.1_t1"):
        args = json.loads((work / "study" / run / "args.json").read_text())
        assert {k: args[k] for k in keys} == recipe["chosen"], run
    assert (work / "study" / "release" / "recipe.json").exists()


def test_unpack_rebuilds_a_release_the_handler_serves(packed, tmp_path, sample_images):
    from handler.skin_handler import SkinLesionHandler
    from skinmodel.release import ReleaseMeta

    work, out = packed
    r = run_training("unpack", "--from", str(out), "--release", str(tmp_path / "release"))
    assert r.returncode == 0, r.stderr[-2000:]
    meta = ReleaseMeta.load(tmp_path / "release")
    assert meta.version == "2.0" and meta.dermoscopy_check and meta.calibration
    assert json.loads((tmp_path / "release" / "results.json").read_text()) == json.loads(
        (work / "study" / "release" / "results.json").read_text())
    answer = SkinLesionHandler.in_process(tmp_path / "release").answer([sample_images[0].read_bytes()])[0]
    assert answer["model"]["version"] == "2.0" and len(answer["predictions"]) == 7, answer

    again = run_training("unpack", "--from", str(out), "--release", str(tmp_path / "release"))
    assert again.returncode == 1 and "--replace" in again.stderr and "Traceback" not in again.stderr


def test_a_damaged_part_is_refused_and_nothing_is_written(packed, tmp_path):
    import shutil

    _, out = packed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    part = copy / json.loads((copy / "manifest.json").read_text())["parts"][1]["name"]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    r = run_training("unpack", "--from", str(copy), "--release", str(tmp_path / "release"))
    assert r.returncode == 1 and "damaged" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "release").exists()


def test_a_failure_after_training_still_sends_the_weights_back(packed, tmp_path, data_dir):
    from training.study.accelerator import rescue
    from training.common.checkpoint import model_from_checkpoint

    work, _ = packed
    rescue(work / "study", tmp_path / "out", RuntimeError("the dermoscopy check step broke"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["error"] == "RuntimeError: the dermoscopy check step broke" and manifest["rescued"] == "resnet18_kd_best.pt"
    r = run_training("unpack", "--from", str(tmp_path / "out"), "--release", str(tmp_path / "back"))
    assert r.returncode == 0 and "sent back its student only" in r.stdout, r.stderr[-2000:]
    back = tmp_path / "back"
    assert {"resnet18_kd_best.pt", "resnet18_kd_history.csv", "teacher.json"} <= {p.name for p in back.iterdir()}
    model, ckpt = model_from_checkpoint(back / "resnet18_kd_best.pt")  # fp16 weights in, fp32 network out
    original, _ = model_from_checkpoint(work / "study" / "resnet18_kd" / "best.pt")
    assert ckpt["teacher"] is True and next(model.parameters()).dtype == torch.float32
    for (k, v), w in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-2, rtol=1e-2), k
    # the steps it prints finish the release on this machine (the dermoscopy check's step is its own tests' business)
    data = ["--data", str(data_dir), "--limit-per-class", "12", "--cache-dir", str(tmp_path / "cache")]
    steps = [shlex.split(line) for line in r.stdout.splitlines() if line.startswith("  python -m training ")]
    assert [s[3] for s in steps] == ["evaluate", "export", "calibrate", "dermoscopy-check", "model-card"]
    for step in steps[:3]:
        done = run_training(*step[3:], *(data if step[3] != "export" else []))
        assert done.returncode == 0, (step, done.stderr[-2000:])
    meta = json.loads((tmp_path / "back-release" / "meta.json").read_text())
    assert meta["temperature"] > 0 and meta["metrics"]["test"]["balanced_accuracy"] >= 0
