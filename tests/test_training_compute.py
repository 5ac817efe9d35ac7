"""Training on whatever it is given: device choice, augmentation on the device, the time budget, torchrun/DDP."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_training
from training.network import augment as A
from training.common.checkpoint import StudyError
from training.common.device import resolve_device
from training.network.recipe import class_weights_from_counts, epochs_for_budget, weighted_ce

fast = pytest.mark.fast


def _identity(n: int) -> A.Draws:
    one, zero = torch.ones(n), torch.zeros(n)
    return A.Draws(area=one, log_ratio=zero, cx=zero + 0.5, cy=zero + 0.5, flip_x=one, flip_y=one, angle=zero,
                   brightness=one, contrast=one, saturation=one, hue=zero)


@fast
def test_auto_device_is_cuda_only_where_a_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"
    with pytest.raises(StudyError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda" and resolve_device("cpu").type == "cpu"


@fast
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_asking_for_cuda_without_one_is_a_clear_error_not_a_traceback(tmp_path):
    r = run_training("train", "--out", str(tmp_path / "run"), "--device", "cuda")
    assert r.returncode == 1 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr


@fast
def test_identity_draw_returns_the_image_and_flips_flip():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    same = A.augment(x, _identity(2), 16, mean, std)
    assert torch.allclose(same, x.float() / 255, atol=1e-5), "the identity transform moved pixels"
    d = _identity(2)
    d.flip_x = -d.flip_x
    assert torch.allclose(A.augment(x, d, 16, mean, std), x.flip(-1).float() / 255, atol=1e-5)
    d = _identity(2)
    d.angle = d.angle + torch.pi / 2  # a right angle on a square image is a pixel permutation
    assert torch.allclose(A.augment(x, d, 16, mean, std), torch.rot90(x, 1, (2, 3)).float() / 255, atol=1e-5)


@fast
def test_a_crop_of_half_the_area_takes_the_left_or_right_half_of_a_wide_image():
    x = torch.randint(0, 256, (2, 3, 16, 32), dtype=torch.uint8)  # height 16, width 32: a mix-up shows
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    d = _identity(2)
    d.area = d.area * 0.5                                         # 16 x 16 of the 16 x 32 source
    d.cx = torch.tensor([0.0, 1.0])                              # leftmost, rightmost
    out = A.augment(x, d, 16, mean, std)
    assert torch.allclose(out[0], x[0, :, :, :16].float() / 255, atol=1e-5)
    assert torch.allclose(out[1], x[1, :, :, 16:].float() / 255, atol=1e-5)


@fast
def test_every_sample_of_a_batch_draws_its_own_transform():
    x = torch.randint(0, 256, (1, 3, 24, 32), dtype=torch.uint8).repeat(8, 1, 1, 1)  # one image, eight times
    d = A.draw(8, A.step_generator(seed=0, epoch=0, step=0))
    out = A.augment(x, d, 16, (0.5,) * 3, (0.25,) * 3)
    assert out.shape == (8, 3, 16, 16) and torch.isfinite(out).all()
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) == 8, "samples of one batch shared a transform"
    again = A.augment(x, A.draw(8, A.step_generator(0, 0, 0)), 16, (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(out, again), "the same (seed, epoch, step) must give the same batch on every rank"
    assert not torch.equal(out, A.augment(x, A.draw(8, A.step_generator(0, 0, 1)), 16, (0.5,) * 3, (0.25,) * 3))
    # a rank's rows of the global draw are exactly those rows of the one-process batch
    assert torch.equal(A.augment(x[4:], d.rows(slice(4, 8)), 16, (0.5,) * 3, (0.25,) * 3), out[4:])


@fast
def test_colour_jitter_stays_in_range_and_keeps_grey_grey():
    grey = torch.full((4, 3, 8, 8), 0.5)
    d = A.draw(4, torch.Generator().manual_seed(1))
    out = A.colour(grey, d)
    assert (out >= 0).all() and (out <= 1).all()
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)
    colourful = torch.rand(4, 3, 8, 8)
    assert not torch.allclose(A.colour(colourful, d), colourful, atol=1e-3)


@fast
def test_time_budget_sizing():
    # 100 s budget, 20 s spent on set-up and two epochs, 10 s per epoch: 8 more epochs fit, 10 in all
    assert epochs_for_budget(100, 20, 10, cap=400) == 10
    assert epochs_for_budget(100, 20, 10, cap=6) == 6             # never more than --epochs
    assert epochs_for_budget(10, 20, 10, cap=400) == 3            # over budget: one more, to anneal the rate
    assert epochs_for_budget(10, 20, 10, cap=2) == 2              # ... unless the cap says no
    assert epochs_for_budget(100, 20, 10.5, cap=400) == 9         # a partial epoch does not fit
    assert epochs_for_budget(100, 90, 10, cap=400, done=7) == 8   # a resumed run: counted from what it did


@fast
def test_a_study_budget_makes_later_runs_pay_for_an_overrun_not_the_steps_after_training():
    from training.study.pipeline import Budget

    now = [1000.0]
    budget = Budget(100, {"resnet18", "resnet50", "grid", "kd"}, clock=lambda: now[0])
    assert budget("resnet18") == pytest.approx(20)
    now[0] += 40                                              # the ResNet18 took 40 s instead of 20
    assert budget("resnet50") == pytest.approx(5)              # 60 s left, 20 + 35 of them belong to grid and kd
    now[0] += 5
    assert budget("grid") == pytest.approx(20) and budget("kd") == pytest.approx(35)
    now[0] += 60
    assert budget("kd") == 1.0                                 # past the deadline: the shortest run (2 epochs)
    without_grid = Budget(80, {"resnet18", "resnet50", "kd"}, clock=lambda: 0.0)
    assert without_grid("resnet18") == pytest.approx(20)          # 0.2 / 0.8 of 80: the grid's share is shared
    assert Budget(None, {"kd"})("kd") is None


@fast
def test_mixup_and_cutmix_pair_mirrored_samples_and_say_how_much_is_their_own():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()  # sample i is all i
    lam = torch.tensor([1.0, 0.75, 0.25, 0.5])
    blended, own = A.mix(x, lam, torch.full((4, 2), 0.5), "mixup")
    assert torch.equal(own, lam) and torch.allclose(blended[1], 0.75 * x[1] + 0.25 * x[2])
    pasted, own = A.mix(x, lam, torch.full((4, 2), 0.5), "cutmix")
    for i in range(4):  # every pixel is the sample's own or its mirror's (3 - i), in the share `own` says
        assert torch.all((pasted[i] == i) | (pasted[i] == 3 - i))
        assert own[i] == pytest.approx((pasted[i] == i).float().mean().item())
    assert own[0] == 1.0 and torch.equal(pasted[0], x[0]) and abs(own[2] - lam[2]) < 0.2  # whole pixels of 8 x 8
    edge, own = A.mix(x, torch.full((4,), 0.75), torch.zeros(4, 2), "cutmix")  # a box clipped at the corner
    assert own[1] == pytest.approx(1 - 2 * 2 / 64)


@fast
def test_a_mixed_loss_weights_both_labels():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    w = class_weights_from_counts([300, 50, 110, 10, 110, 670, 15])
    partner, lam = y.flip(0), torch.rand(6)
    mixed = weighted_ce(logits, y, w, 0.0, partner, lam)
    by_hand = (lam * weighted_ce_each(logits, y, w) + (1 - lam) * weighted_ce_each(logits, partner, w)).mean()
    assert torch.isclose(mixed, by_hand, atol=1e-6)
    assert torch.isclose(weighted_ce(logits, y, w, 0.0, partner, torch.ones(6)), weighted_ce(logits, y, w))


def weighted_ce_each(logits, y, w):
    return torch.nn.functional.cross_entropy(logits, y, reduction="none") * w[y]


@fast
def test_loss_of_a_batch_is_the_mean_of_its_halves_so_ranks_add_up():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 7), torch.randint(0, 7, (16,))
    w = class_weights_from_counts([300, 50, 110, 10, 110, 670, 15])
    whole = weighted_ce(logits, y, w, 0.1)
    halves = (weighted_ce(logits[:8], y[:8], w, 0.1) + weighted_ce(logits[8:], y[8:], w, 0.1)) / 2
    assert torch.isclose(whole, halves, atol=1e-6)


@fast
def test_class_weightings_average_one_over_the_training_images():
    counts = torch.tensor([300.0, 50, 110, 10, 110, 670, 15])
    for weighting in ("inverse", "sqrt", "none"):
        w = class_weights_from_counts(counts, weighting)
        assert torch.isclose((w * counts).sum() / counts.sum(), torch.tensor(1.0))
    inverse, sqrt = class_weights_from_counts(counts, "inverse"), class_weights_from_counts(counts, "sqrt")
    assert inverse[3] / inverse[5] > sqrt[3] / sqrt[5] > 1, "sqrt must push towards rare classes, less than 1/n"


def test_eval_path_is_the_handlers_preprocessing_bit_for_bit(data_dir, tmp_path):
    """Validation and test scoring feed the network exactly the tensors the served handler makes of the files."""
    from skinmodel.preprocessing import preprocess_bytes
    from training.common import data as D
    from training.common.metrics import predict_logits

    cfg = D.DataConfig(data=str(data_dir), limit_per_class=6, img_size=64, resize_size=72)
    records = D.load_split(cfg).records[:12]
    pre = cfg.preprocess()
    cache = D.build_cache(records, "eval", pre, tmp_path)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 7)

    predict_logits(Recorder(), cache, pre.mean, pre.std, batch_size=5)
    expected = torch.stack([preprocess_bytes(open(r.path, "rb").read(), pre) for r in records])
    assert torch.equal(torch.cat(seen), expected)


def test_time_budget_sizes_the_run_and_the_schedule_completes(tmp_path, data_dir):
    r = run_training("train", "--out", str(tmp_path / "run"), "--img-size", "32", "--limit-per-class", "6",
                     "--batch-size", "8", "--epochs", "200", "--time-budget", "8", "--cache-dir",
                     str(tmp_path / "cache"), "--data", str(data_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    budget = json.loads((tmp_path / "run" / "budget.json").read_text())
    planned = epochs_for_budget(budget["time_budget_s"], budget["elapsed_s"], budget["epoch_s"], budget["cap"],
                                budget["done"])
    assert budget["done"] == 2 and budget["planned_epochs"] == planned and 2 <= planned < 200
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert len(rows) == planned
    # sized, not merely recorded: 200 epochs would take far longer than the 8 s asked for (noise allowed)
    assert sum(float(r["seconds"]) for r in rows) < 8 * 1.5
    # the cosine schedule ran to its end: the last epoch's learning rate is the floor (1 % of the peak)
    assert float(rows[-1]["lr"]) == pytest.approx(2e-3 * 0.01, rel=1e-3)


def test_two_processes_under_torchrun_train_what_one_process_trains(tmp_path, data_dir):
    """2 CPU ranks (gloo), global batch 8, against one process taking the same batch as 2 micro-batches: the
    same weights, one set of files, and validation over the whole split."""
    from training.common import data as D
    from training.common.checkpoint import model_from_checkpoint
    from training.common.metrics import classification_metrics, predict_logits

    common = ["--img-size", "32", "--limit-per-class", "8", "--batch-size", "8", "--epochs", "2", "--threads", "1",
              "--device", "cpu", "--ema", "0.9", "--mix", "cutmix", "--cache-dir", str(tmp_path / "cache"),
              "--data", str(data_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "training", "train", "--out", str(tmp_path / "ddp"), *common],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "training", "train", "--out", str(tmp_path / "one"),
                          "--grad-accum", "2", *common], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-2000:]

    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    params = dict(model_from_checkpoint(tmp_path / "one" / "last.pt")[0].named_parameters())
    worst = max((a[w][k] - b[w][k]).abs().max().item() for k in params for w in ("model", "ema"))
    assert worst < 1e-5, f"2 ranks and 1 process ended {worst} apart"
    assert a["epoch"] == b["epoch"] == 1

    # one set of files: the same names as the one-process run, one history row per epoch, one header
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    lines = (tmp_path / "ddp" / "history.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch,")
    assert ddp.stdout.count("ddp epoch 2/2: loss") == 1, "a rank other than 0 printed or wrote"

    # the validation figure of the last epoch is the saved average's (--ema) on the whole split
    cfg = D.DataConfig(data=str(data_dir), limit_per_class=8, img_size=32, cache_dir=str(tmp_path / "cache"))
    val = D.load_split(cfg).part("val")
    model, _ = model_from_checkpoint(tmp_path / "ddp" / "last.pt")
    model.load_state_dict(a["ema"])
    x = D.build_cache(val, "eval", cfg.preprocess(), cfg.cache)
    y = np.array([r.label for r in val])
    m = classification_metrics(y, predict_logits(model, x, cfg.preprocess().mean, cfg.preprocess().std)
                               .argmax(1).numpy(), D.CLASS_NAMES)
    last = list(csv.DictReader(open(tmp_path / "ddp" / "history.csv")))[-1]
    assert float(last["val_balanced_accuracy"]) == pytest.approx(m["balanced_accuracy"])
    assert float(last["val_macro_f1"]) == pytest.approx(m["macro_f1"])
    # the logits themselves (BatchNorm statistics of the average included), not only their argmax
    nll = torch.nn.functional.cross_entropy(predict_logits(model, x, cfg.preprocess().mean, cfg.preprocess().std),
                                            torch.from_numpy(y)).item()
    assert float(last["val_nll"]) == pytest.approx(nll, rel=1e-4)
