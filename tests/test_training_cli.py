"""The training commands end to end on real HAM10000 images, at tiny size."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from skinmodel.networks import build_model
from tests import background
from tests.conftest import REPO, interruptible_child, run_training
from training.common.checkpoint import StudyError, load_init_weights, model_from_checkpoint


def test_every_command_has_help(capsys):
    from training.__main__ import COMMANDS, main

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and f"python -m training {command}" in capsys.readouterr().out, command


@pytest.mark.fast
def test_trust_formerly_named_the_dermoscopy_check_and_still_runs_it(capsys):
    """The old command name prints nothing different from the new one, and the top-level help lists only the new."""
    from training.__main__ import main

    outputs = []
    for command in ("dermoscopy-check", "trust"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        outputs.append((exit_.value.code, capsys.readouterr().out))
    assert outputs[0] == outputs[1] and "python -m training dermoscopy-check" in outputs[0][1]
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert "dermoscopy-check" in listed and " trust " not in listed


def test_top_level_help_lists_commands():
    r = run_training("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "grid", "evaluate", "export", "all"))


def test_unknown_data_dir_is_a_clear_error(tmp_path):
    r = run_training("split", "--data", str(tmp_path / "missing"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_quick_study_end_to_end(tmp_path, data_dir):
    """The session-sized study (--epochs-resnet50 0, as release 2.0 was trained): no ResNet50 is trained, scored or
    offered as a teacher. The accelerator script's test covers the study with a ResNet50. The study itself
    (`python -m training all --quick --grid --epochs-resnet50 0`) ran in the background (tests/background.py)."""
    folder = background.result("quick study")
    study = folder / "study"
    assert not (study / "resnet50").exists()
    assert set(json.loads((study / "teacher.json").read_text())["candidates"]) == {"resnet18"}
    release = study / "release"
    meta = json.loads((release / "meta.json").read_text())
    assert meta["arch"] == "resnet18" and meta["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert meta["training"]["distilled"] is True
    assert meta["temperature"] == meta["calibration"]["temperature"] > 0
    assert (release / "reliability.png").exists()
    assert meta["split_hash"] == json.loads((study / "report" / "results.json").read_text())["split_hash"]
    results = json.loads((release / "results.json").read_text())
    # the release carries the test figures the study measured for it, not others
    assert meta["metrics"]["test"]["balanced_accuracy"] == results["models"]["resnet18 distilled"]["balanced_accuracy"]
    assert set(results["models"]) >= {"majority class (always nv)", "resnet18 (scratch)", "resnet18 distilled"}
    assert not any("resnet50" in name for name in results["models"])
    majority = results["models"]["majority class (always nv)"]
    assert majority["per_class_recall"]["nv"] == 1.0 and majority["per_class_recall"]["mel"] == 0.0
    report = (release / "report.md").read_text()
    assert "| resnet18 distilled |" in report and "lesion" in report
    served = json.loads((release / "served_test" / "results.json").read_text())  # the release as served, on test
    assert served["images"] == results["n_test_images"] and {"age band", "sex", "body site"} <= set(served["subgroups"])
    assert "Subgroups (test split, the release as served)" in (release / "model_card.md").read_text()
    assert "| age band |" in (release / "report.md").read_text(), "the study's report lacks the subgroup tables"
    for png in ("confusion_resnet18_distilled.png", "confusion_resnet18_scratch.png", "history_kd.png", "history_resnet18.png", "kd_grid.png"):
        assert (release / png).read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(study / "grid" / "grid.csv")))
    assert len(rows) == 4 and {"alpha", "temperature", "val_macro_f1"} <= set(rows[0])
    history = list(csv.DictReader(open(study / "resnet18_kd" / "history.csv")))
    assert history and float(history[0]["train_kd"]) > 0, "distillation term was zero: KD is a no-op"
    # the release scored on validation as the default is chosen: plain and both shifts, their mean
    r = run_training("compare-releases", "--release", str(release), "--limit-per-class", "12", "--data", str(data_dir),
                     "--cache-dir", str(folder / "cache"), "--json", str(tmp_path / "scores.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    score = json.loads((tmp_path / "scores.json").read_text())[str(release)]
    parts = [score[k] for k in ("plain", "colour temperature", "brightness")]
    assert abs(score["score"] - sum(parts) / 3) < 1e-9 and score["version"] == meta["version"]
    # the exported fp16 weights load into the architecture named in meta.json
    model = build_model(meta["arch"], meta["num_classes"])
    model.load_state_dict({k: v.float() for k, v in torch.load(release / "model.pt").items()})


def _rows(path):
    return list(csv.DictReader(open(path))) if path.exists() else []


def test_resume_continues_from_last_epoch(tmp_path, data_dir):
    """A resumed run trains only the epochs after its checkpoint: epoch 1's row (its measured seconds included) is
    kept as it was, and epoch 1 is not trained again (a fresh run would print it and re-measure its seconds)."""
    common = ["--out", str(tmp_path / "run"), "--img-size", "32", "--limit-per-class", "6", "--batch-size", "8",
              "--cache-dir", str(tmp_path / "cache"), "--data", str(data_dir)]
    assert run_training("train", "--epochs", "1", *common).returncode == 0
    first = _rows(tmp_path / "run" / "history.csv")
    r = run_training("train", "--epochs", "2", "--resume", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "run" / "history.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"] and rows[0] == first[0]
    assert "run epoch 1/2:" not in r.stdout and "run epoch 2/2:" in r.stdout


GRID_EPOCHS = 12  # the interrupted cell's


def _wait_for_rows(path, n: int, proc, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_rows(path)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} never reached {n} rows (process exit {proc.poll()})")


def test_an_interrupted_grid_cell_resumes_at_its_epoch_with_its_history(tmp_path, data_dir):
    """SIGINT in the middle of a grid cell (as a stopped session does), then the same command again: the cell goes
    on from its last completed epoch, its earlier rows untouched, and ends with every epoch once. 12 short epochs:
    the signal must land before the cell ends even when a loaded machine wakes this test late."""
    small = ["--img-size", "32", "--limit-per-class", "6", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"),
             "--data", str(data_dir)]
    assert run_training("train", "--out", str(tmp_path / "teacher"), "--epochs", "1", *small).returncode == 0
    grid = [sys.executable, "-m", "training", "grid", "--out", str(tmp_path / "grid"), "--teacher",
            str(tmp_path / "teacher" / "best.pt"), "--alphas", "0.5", "--temps", "2", "--epochs", str(GRID_EPOCHS),
            *small]
    history = tmp_path / "grid" / "a0.5_t2" / "history.csv"
    # SIGINT as a user's Ctrl-C (conftest.interruptible_child)
    proc = subprocess.Popen(grid, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible_child)
    _wait_for_rows(history, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "rerun with --resume" in err, (proc.returncode, err[-2000:])
    # What a resume continues from: the last checkpoint (a row written just before the signal, without its
    # checkpoint, is trained again, as nothing saved it).
    kept = torch.load(history.parent / "last.pt", map_location="cpu", weights_only=False)["epoch"] + 1
    before = _rows(history)[:kept]
    assert 1 <= kept < GRID_EPOCHS, "interrupted too late to show a resume"
    r = subprocess.run(grid, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(history)
    assert [row["epoch"] for row in rows] == [str(e) for e in range(1, GRID_EPOCHS + 1)]
    assert rows[:kept] == before, "the rows of the checkpointed epochs changed"
    assert f"resumed from {history.parent / 'last.pt'} at epoch {kept + 1}" in r.stdout
    assert all(f"a0.5_t2 epoch {e}/{GRID_EPOCHS}:" not in r.stdout for e in range(1, kept + 1)), "epochs trained twice"
    assert (tmp_path / "grid" / "chosen.json").exists()


def test_teacher_from_a_weights_file_and_init_from_imagenet_style_weights(tmp_path, data_dir):
    teacher_file = tmp_path / "teacher.pth"
    torch.save(build_model("resnet18", 7).state_dict(), teacher_file)
    imagenet_like = tmp_path / "imagenet.pth"  # a 1000-class head, as torchvision's ImageNet weights have
    torch.save(build_model("resnet18", 1000).state_dict(), imagenet_like)
    r = run_training("train", "--out", str(tmp_path / "kd"), "--epochs", "1", "--img-size", "32",
                     "--limit-per-class", "6", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"),
                     "--data", str(data_dir), "--teacher-weights", str(teacher_file), "--teacher-arch", "resnet18",
                     "--init-weights", str(imagenet_like))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "re-initialised: fc.bias, fc.weight" in r.stdout
    model, ckpt = model_from_checkpoint(tmp_path / "kd" / "best.pt")
    assert ckpt["teacher"] is True and model.fc.out_features == 7


def test_init_weights_from_another_architecture_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(build_model("resnet50", 7).state_dict(), path)
    with pytest.raises(StudyError, match="does not match"):
        load_init_weights(build_model("resnet18", 7), path)


def test_a_saved_study_record_lets_the_recipe_search_skip_its_finished_runs(tmp_path, data_dir, capsys):
    """What `training/background.sh save` keeps of a study (no weights) outlives the machine: restored into an
    empty folder elsewhere, the recipe search skips every finished run and chooses the same recipe."""
    from training.network.train import TrainConfig
    from training.study.pipeline import StudyConfig, get_args_parser
    from training.study.recipe_search import search_recipe

    study = StudyConfig.from_args(get_args_parser().parse_args(
        ["--quick", "--data", str(data_dir), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]))
    base = TrainConfig(out="", data=study.data, arch="resnet18", batch_size=study.batch_size, seed=study.seed,
                       device=study.device, precision=study.precision, recipe=study.recipe)
    search = {"ema": [{"ema": 0.0}, {"ema": 0.9}]}
    first = tmp_path / "machine-a" / "study-x"
    chosen = search_recipe(study.data, first / "recipe", base, 1, search)
    (first / "background.json").write_text('{"commit": "0000000", "flags": []}')
    (first / "study.json").write_text("{}")
    env = {**os.environ, "SKIN_STUDY_RECORDS": str(tmp_path / "records")}
    script = str(REPO / "training" / "background.sh")
    for cmd, out in (("save", first), ("restore", tmp_path / "machine-b" / "study-x")):
        r = subprocess.run([script, cmd, "--out", str(out)], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
    second = tmp_path / "machine-b" / "study-x"
    assert not list(second.rglob("*.pt")), "the record holds weights"
    capsys.readouterr()
    assert search_recipe(study.data, second / "recipe", base, 1, search) == chosen
    printed = capsys.readouterr().out
    assert printed.count("[skip]") == 2 and "[run]" not in printed, printed
    # never mixed with another study: not restored over one, not saved over another's record
    r = subprocess.run([script, "restore", "--out", str(second)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "already holds a study" in r.stderr
    (first / "background.json").write_text('{"commit": "1111111", "flags": []}')
    r = subprocess.run([script, "save", "--out", str(first)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "holds another study" in r.stderr
