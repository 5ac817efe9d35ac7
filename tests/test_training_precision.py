"""bf16 training on the CPU's AMX / AVX512-BF16 units (--precision), and its guard against a silent fallback."""
from __future__ import annotations

import csv

import pytest
import torch

from skinmodel.networks import build_model
from tests.conftest import run_training
from training.common import device as dev
from training.common.checkpoint import StudyError, load_checkpoint
from training.common.data import DataConfig, build_cache, load_split
from training.common.metrics import predict_logits

fast = pytest.mark.fast


@fast
def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert dev.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(dev, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert dev.resolve_precision("auto", cpu) == "fp32"
    assert dev.resolve_precision("bf16", cpu) == "bf16", "an explicit bf16 is honoured"
    assert dev.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(StudyError, match="unknown precision"):
        dev.resolve_precision("fp16", cpu)


@fast
def test_a_silent_fallback_to_fp32_is_an_error(monkeypatch):
    model = dev.Runtime(torch.device("cpu"), "bf16").prepare(build_model("resnet18", 7))
    assert dev.Runtime(torch.device("cpu"), "bf16").check_precision(model) == "bfloat16"
    assert dev.Runtime(torch.device("cpu"), "fp32").check_precision(model) == "float32"
    import contextlib

    monkeypatch.setattr(dev.Runtime, "autocast", lambda self: contextlib.nullcontext())  # autocast that does nothing
    with pytest.raises(StudyError, match="autocast fell back"):
        dev.Runtime(torch.device("cpu"), "bf16").check_precision(model)


def _run(tmp_path, data_dir, name: str, precision: str, seed: int):
    r = run_training("train", "--out", str(tmp_path / name), "--epochs", "2", "--img-size", "32", "--limit-per-class",
                     "25", "--batch-size", "16", "--seed", str(seed), "--precision", precision,
                     "--cache-dir", str(tmp_path / "cache"), "--data", str(data_dir), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / name / "history.csv")))
    state = load_checkpoint(tmp_path / name / "last.pt")
    model = build_model("resnet18", 7)
    model.load_state_dict(state["model"])
    return rows, model


def test_bf16_and_fp32_training_agree_closer_than_two_seeds_do(tmp_path, data_dir):
    """The tolerance is the run-to-run spread training already has: bf16 (8-bit mantissa, ~0.4 % relative error
    per operation) from seed 0 must end nearer to fp32 from seed 0 than fp32 from seed 1 does, measured as the
    mean total-variation distance of their validation probabilities. And the bf16 run computed in bf16."""
    fp32, m_fp32 = _run(tmp_path, data_dir, "fp32", "fp32", 0)
    bf16, m_bf16 = _run(tmp_path, data_dir, "bf16", "bf16", 0)
    _, m_seed = _run(tmp_path, data_dir, "seed1", "fp32", 1)
    assert {r["train_dtype"] for r in bf16} == {"bfloat16"}, "the bf16 run's steps did not compute in bf16"
    assert {r["train_dtype"] for r in fp32} == {"float32"}
    cfg = DataConfig(data=str(data_dir), limit_per_class=25, img_size=32, cache_dir=str(tmp_path / "cache"))
    pre = cfg.preprocess()
    x = build_cache(load_split(cfg).part("val"), "eval", pre, cfg.cache)
    probs = {k: predict_logits(m, x, pre.mean, pre.std).softmax(1) for k, m in
             (("fp32", m_fp32), ("bf16", m_bf16), ("seed1", m_seed))}

    def tv(a, b):
        return 0.5 * (probs[a] - probs[b]).abs().sum(1).mean().item()

    assert tv("bf16", "fp32") < tv("seed1", "fp32"), (tv("bf16", "fp32"), tv("seed1", "fp32"))


@fast
def test_status_counts_what_is_left_from_the_studys_own_measured_epochs(tmp_path, capsys):
    """A study with a ResNet18 at 2 of 10 epochs (60 s each): what is left is its 8 epochs, then a ResNet50
    (2.3x a ResNet18 epoch) and the distilled student (1 + a ResNet50 teacher's forward, 0.76), both not started."""
    import json

    from training.study import status as S

    settings = {"data": {"img_size": 128}, "epochs_resnet18": 10, "epochs_resnet50": 4, "epochs_kd": 10,
                "recipe_search": False, "grid": False, "equal_compute": False, "recipe_sizes": [128]}
    (tmp_path / "study.json").write_text(json.dumps({"settings": settings, "commit": "abc", "started": "now"}))
    run = tmp_path / "resnet18"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"arch": "resnet18", "img_size": 128, "teacher": [], "epochs": 10}))
    (run / "history.csv").write_text("epoch,seconds\n1,61\n2,60\n")
    st = S.status(tmp_path)
    assert st["not_started"] == ["resnet50", "resnet18_kd"]
    assert st["training_hours_left_estimate"] == round((8 * 61 + 4 * 2.3 * 61 + 10 * 1.76 * 61) / 3600, 2)
    assert "2/10 epochs" in S.render(st)
