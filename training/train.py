"""Train one network on HAM10000, optionally distilled from a frozen teacher, on a CPU, a GPU or under torchrun.

    python -m training train --arch resnet18 --out runs/resnet18
    python -m training train --arch resnet18 --out runs/kd --teacher runs/resnet18/best.pt runs/resnet50/best.pt
    python -m training train --device cuda --img-size 224 --epochs 400 --time-budget 120 --out runs/r18
    torchrun --nproc_per_node=4 -m training train --device cuda --batch-size 512 --out runs/r18

The decoded uint8 images live on the training device for the whole run and are augmented there in batches
(training/augment.py). --batch-size is the global batch: under torchrun each rank takes its rows of every batch
of one shared order, so N processes take the same optimiser steps one process would with --grad-accum N.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from skinmodel.networks import ARCHITECTURES, build_model
from training import data as D
from training.augment import MIXES, augment, draw, draw_mix, mix, step_generator
from training.checkpoint import StudyError, atomic_save, load_checkpoint, load_init_weights, load_teacher
from training.device import Runtime, add_device_args, setup
from training.metrics import classification_metrics, predict_logits
from training.plots import plot_history
from training.recipe import (CLASS_WEIGHTINGS, class_weights_from_counts, epochs_for_budget, kd_loss,
                             warmup_cosine, weighted_ce)


@dataclass
class TrainConfig:
    """One training run: the data, the network, the recipe and (for distillation) the teacher."""

    out: str
    data: D.DataConfig = field(default_factory=D.DataConfig)
    arch: str = "resnet18"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3                 # peak AdamW learning rate
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    max_train_images: int | None = None
    init_weights: str | None = None  # a state_dict to start from (the head is re-initialised)
    resume: bool = False
    teacher: list[str] = field(default_factory=list)  # checkpoint(s); several are averaged
    teacher_weights: str | None = None
    teacher_arch: str | None = None
    alpha: float = 0.5               # weight of the KD term (1 - alpha on cross-entropy)
    temperature: float = 4.0
    teacher_tta: bool = False        # the teacher averages its 8 dihedral views (8 forward passes a step)
    class_weighting: str = "inverse"  # inverse | sqrt | none (training/recipe.py)
    label_smoothing: float = 0.0
    ema: float = 0.0                 # decay of an exponential moving average of the weights (0: off)
    mix: str = "none"                # none | mixup | cutmix (training/augment.py)
    mix_alpha: float = 1.0           # Beta(alpha, alpha) of the share each image keeps
    device: str = "auto"
    precision: str = "auto"          # auto | fp32 | bf16 (training/device.py); scoring is always fp32
    grad_accum: int = 1              # micro-batches per optimiser step and rank
    time_budget: float | None = None  # seconds; sizes the epoch count (at most `epochs`)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"data"}
        return cls(data=D.DataConfig.from_args(args), **{k: getattr(args, k) for k in names})

    def record(self) -> dict:
        """Flat, as checkpoints and meta.json's training.args have always stored it."""
        flat = dataclasses.asdict(self)
        return {**flat.pop("data"), **flat}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    d = TrainConfig(out="")
    p = argparse.ArgumentParser(description="Train one model on HAM10000 (optionally with a distillation teacher).",
                                add_help=add_help)
    D.add_data_args(p)
    p.add_argument("--arch", default=d.arch, choices=ARCHITECTURES)
    p.add_argument("--out", required=True, help="run folder: checkpoints, history.csv, history.png")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-train-images", type=int, default=None, help="budget: train on a random subset of N images")
    p.add_argument("--init-weights", help="state_dict to start from (e.g. local ImageNet weights; the head is skipped)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    kd = p.add_argument_group("distillation")
    kd.add_argument("--teacher", nargs="*", default=[], help="teacher checkpoint(s); several are averaged")
    kd.add_argument("--teacher-weights", help="teacher as a plain 7-class state_dict file (needs --teacher-arch)")
    kd.add_argument("--teacher-arch", choices=ARCHITECTURES)
    kd.add_argument("--alpha", type=float, default=d.alpha, help="weight of the KD term (1 - alpha on cross-entropy)")
    kd.add_argument("--temperature", type=float, default=d.temperature)
    kd.add_argument("--teacher-tta", action="store_true",
                    help="the teacher answers with the mean of its 8 flipped/rotated views (8x its cost)")
    add_recipe_args(p)
    c = p.add_argument_group("compute")
    add_device_args(c)
    c.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="split each rank's share of a batch into this many micro-batches (same steps, less memory)")
    c.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="fit the run into this wall time: the epoch count (at most --epochs) is sized from the "
                        "second epoch's measured length, so the cosine schedule still completes")
    return p


RECIPE_FIELDS = ("class_weighting", "label_smoothing", "ema", "mix", "mix_alpha")  # shared by every run of a study, grid included


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The recipe flags, once, for train, grid, all and accelerator."""
    d = TrainConfig(out="")
    r = p.add_argument_group("recipe")
    r.add_argument("--class-weighting", default=d.class_weighting, choices=CLASS_WEIGHTINGS,
                   help="loss weight per class: inverse frequency, its square root, or none")
    r.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    r.add_argument("--ema", type=float, default=d.ema, help="EMA decay of the weights, e.g. 0.999 (0: off); "
                                                            "validation and checkpoints then use the average")
    r.add_argument("--mix", default=d.mix, choices=MIXES, help="mix each image with another of its batch")
    r.add_argument("--mix-alpha", type=float, default=d.mix_alpha, help="Beta(alpha, alpha) of the mix")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """One step of the weights' moving average. The decay ramps up over the first steps ((1 + n) / (10 + n)), so
    the random initial weights do not linger in the average of a short run."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def validate(rt: Runtime, model, x_val: torch.Tensor, y_val: np.ndarray, cfg) -> tuple[torch.Tensor, dict]:
    """The whole validation split, scored once across all ranks: each rank its shard, every rank all logits."""
    rows = rt.shard(len(x_val))
    local = (predict_logits(model, x_val[rows.start:rows.stop], cfg.mean, cfg.std, device=rt.device) if len(rows)
             else torch.empty(0, len(D.CLASS_NAMES)))  # more ranks than batches of the split: nothing to score
    logits = rt.gather_rows(local)
    return logits, classification_metrics(y_val, logits.argmax(1).numpy(), D.CLASS_NAMES)


def train(run: TrainConfig) -> dict:
    """Train (or resume) one run; returns the best epoch's validation figures (also in OUT/best.json)."""
    rt = setup(run.device, run.precision)
    try:
        return _train(run, rt)
    finally:
        rt.close()


def run_or_resume(run: TrainConfig) -> dict:
    """The one way a study trains a network (its baselines, every recipe-search run, every grid cell, the student):
    a finished run (OUT/best.json) is read back, an interrupted one continues at its last completed epoch with its
    history, a new one starts. A process may be ended at any moment: at most the epoch in progress is lost."""
    done = Path(run.out) / "best.json"
    if done.exists():
        print(f"[skip] {run.out} is complete", flush=True)
        return json.loads(done.read_text())
    print(f"[run] {run.arch} -> {run.out}", flush=True)
    return train(dataclasses.replace(run, resume=True))


@dataclass
class Batches:
    """What train_one_epoch draws from: the uint8 images and labels on the device, and the class weights."""
    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor
    steps: int  # optimiser steps per epoch


def _loss(run: TrainConfig, net, teacher, x, y, weights, partner, lam):
    """The step's loss (and its KD term, 0 without a teacher); the logits' dtype tells what autocast computed."""
    logits = net(x)
    if teacher is None:
        return weighted_ce(logits.float(), y, weights, run.label_smoothing, partner, lam), None, logits.dtype
    with torch.no_grad():
        teacher_logits = teacher(x)  # the same augmented view as the student
    loss, kd, _ = kd_loss(logits.float(), teacher_logits, y, run.alpha, run.temperature, weights,
                          run.label_smoothing, partner, lam)
    return loss, kd, logits.dtype


def train_one_epoch(run: TrainConfig, rt: Runtime, net, model, ema, teacher, optimizer, scheduler, data: Batches,
                    cfg, epoch: int, desc: str) -> dict:
    """One pass over the training set in the shared order of (seed, epoch): per step, every sample's augmentation
    drawn for the whole global batch, this rank's rows in micro-batches, one optimiser step, the EMA updated.
    Returns this rank's sums (loss, kd) and sample count, and the dtype the network computed in."""
    model.train()
    order = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(run.seed * 1_000_003 + epoch))
    per_rank = run.batch_size // rt.world
    micro = per_rank // run.grad_accum
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    kd_sum, dtype = torch.zeros_like(loss_sum), None
    bar = tqdm(range(data.steps), desc=desc, unit="batch", disable=not rt.is_main)
    for step in bar:
        batch = order[step * run.batch_size:(step + 1) * run.batch_size]
        gen = step_generator(run.seed, epoch, step)
        draws = draw(run.batch_size, gen)  # one draw per sample of the global batch, the same on all ranks
        mixes = draw_mix(run.batch_size, gen, run.mix_alpha) if run.mix != "none" else None
        optimizer.zero_grad(set_to_none=True)
        for k in range(run.grad_accum):
            rows = slice(rt.rank * per_rank + k * micro, rt.rank * per_rank + (k + 1) * micro)
            idx = batch[rows].to(rt.device)
            x = augment(data.x[idx], draws.rows(rows), cfg.crop_size, cfg.mean, cfg.std)
            y, partner, lam = data.y[idx], None, None
            if mixes is not None:
                x, lam = mix(x, mixes[0][rows], mixes[1][rows], run.mix)
                partner = y.flip(0)
            last = k == run.grad_accum - 1  # DDP all-reduces gradients on a step's last micro-batch only
            with net.no_sync() if rt.distributed and not last else contextlib.nullcontext():
                with rt.autocast():
                    loss, kd, dtype = _loss(run, net, teacher, rt.layout(x), y, data.weights, partner, lam)
                (loss / run.grad_accum).backward()
            loss_sum += loss.detach() * len(idx)
            if kd is not None:
                kd_sum += kd.detach() * len(idx)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            _ema_update(ema, model, run.ema, scheduler.last_epoch)
        if rt.is_main and step % 20 == 0:  # .item() waits for the GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
    return {"loss": loss_sum.item(), "kd": kd_sum.item(), "seen": data.steps * per_rank,
            "dtype": str(dtype).removeprefix("torch.")}


def _load_data(run: TrainConfig, rt: Runtime, out: Path):
    """The split, its uint8 caches on the device (decoded once, by rank 0 first) and the class weights."""
    split = D.load_split(run.data)
    train_set, val = split.part("train"), split.part("val")
    if run.max_train_images and run.max_train_images < len(train_set):
        train_set = random.Random(run.seed).sample(train_set, run.max_train_images)
    steps = len(train_set) // run.batch_size
    if steps == 0:
        raise StudyError(f"the training set has {len(train_set)} images, fewer than one batch of {run.batch_size}")
    cfg = run.data.preprocess()
    with rt.main_first():  # rank 0 decodes into the cache; the others then read it
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            D.write_splits(split.records, out / "splits.csv")
        x_train = D.build_cache(train_set, "train", cfg, run.data.cache, "decode train")
        x_val = D.build_cache(val, "eval", cfg, run.data.cache, "decode val")
    # The whole uint8 dataset stays on the device: no loader, no per-step copies from the host.
    weights = class_weights_from_counts(D.class_counts(train_set), run.class_weighting).to(rt.device)
    data = Batches(x_train.to(rt.device), torch.tensor([r.label for r in train_set], device=rt.device), weights, steps)
    return split, cfg, data, x_val.to(rt.device), np.array([r.label for r in val])


def _resume(run: TrainConfig, rt: Runtime, out: Path, model, ema, optimizer, scheduler, plan: dict):
    """(first epoch, best so far): from OUT/last.pt when resuming, else (0, nothing). Every rank resumes or none."""
    resuming = rt.sum([float(run.resume and (out / "last.pt").exists())])[0]
    if 0 < resuming < rt.world:
        raise StudyError(f"{out / 'last.pt'} exists for some ranks only: under multi-node torchrun the run folder "
                         "(--out) and --cache-dir must be on a filesystem every node sees")
    if not resuming:
        return 0, {"val_macro_f1": -1.0}
    state = load_checkpoint(out / "last.pt")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state.get("ema") or state["model"])
    if run.time_budget and state.get("budget_decided"):  # without a budget, --epochs may extend a finished run
        plan.update(epochs=min(run.epochs, state["planned_epochs"]), decided=True)
    print(f"resumed from {out / 'last.pt'} at epoch {state['epoch'] + 2}", flush=True)
    return state["epoch"] + 1, state["best"]


def _trim_history(path: Path, start_epoch: int) -> None:
    """Rows of epochs after the checkpoint (a run killed between writing its row and saving last.pt) go."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if start_epoch:
        path.write_text("".join(lines[:1 + start_epoch]))
    else:
        path.unlink()


def _decide_budget(run: TrainConfig, rt: Runtime, out: Path, plan: dict, epoch: int, started: float,
                   measured_from: float) -> None:
    """Size the epoch count from one whole measured epoch (saves and plots included); rank 0's clock decides."""
    elapsed, epoch_s = round(time.time() - started, 3), round(time.time() - measured_from, 3)
    planned = epochs_for_budget(run.time_budget, elapsed, epoch_s, run.epochs, done=epoch)
    plan.update(epochs=rt.broadcast_int(planned), decided=True)
    if rt.is_main:
        (out / "budget.json").write_text(json.dumps({
            "time_budget_s": run.time_budget, "elapsed_s": elapsed, "epoch_s": epoch_s,
            "done": epoch, "cap": run.epochs, "planned_epochs": plan["epochs"]}, indent=2))
        print(f"time budget {run.time_budget:.0f} s: {plan['epochs']} epochs ({epoch_s:.1f} s per epoch measured)",
              flush=True)


def _train(run: TrainConfig, rt: Runtime) -> dict:
    started, out = time.time(), Path(run.out)
    if run.batch_size % (rt.world * run.grad_accum):
        raise StudyError(f"--batch-size {run.batch_size} must be a multiple of processes x --grad-accum "
                         f"({rt.world} x {run.grad_accum})")
    run.data.use_threads()
    seed_everything(run.seed)  # the same seed on every rank: identical initial weights
    split, cfg, data, x_val, y_val = _load_data(run, rt, out)
    model = build_model(run.arch, len(D.CLASS_NAMES))
    if run.init_weights:
        skipped = load_init_weights(model, run.init_weights)
        print(f"initialised from {run.init_weights} (re-initialised: {', '.join(skipped) or 'nothing'})")
    model = rt.prepare(model)
    rt.check_precision(model, cfg.crop_size)
    teacher = load_teacher(run.teacher, run.teacher_weights, run.teacher_arch, len(D.CLASS_NAMES), cfg,
                           run.teacher_tta)
    teacher = rt.prepare(teacher) if teacher is not None else None
    ema = copy.deepcopy(model).requires_grad_(False) if run.ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    plan = {"epochs": run.epochs, "decided": False}  # a time budget sizes it after two epochs; the schedule follows
    warmup = int(run.warmup_epochs * data.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, plan["epochs"] * data.steps, warmup))
    start_epoch, best = _resume(run, rt, out, model, ema, optimizer, scheduler, plan)
    net = rt.wrap(model)  # what the steps call: DDP averages gradients across ranks (after any resume)
    if rt.is_main:
        _trim_history(out / "history.csv", start_epoch)
        (out / "args.json").write_text(json.dumps(run.record(), indent=2))
    base = {"arch": run.arch, "class_names": list(D.CLASS_NAMES), "preprocessing": cfg.to_dict(),
            "split_hash": split.hash, "args": run.record(), "teacher": bool(teacher), "precision": rt.precision}
    epoch, measured_from = start_epoch, None
    while epoch < plan["epochs"]:
        if run.time_budget and not plan["decided"]:
            # The first epoch of a process pays for warm-up (autotuning, caches): the next one is the measure.
            if epoch == start_epoch + 1:
                measured_from = time.time()
            elif measured_from is not None:
                _decide_budget(run, rt, out, plan, epoch, started, measured_from)
                if epoch >= plan["epochs"]:
                    break
        epoch_started = time.time()
        sums = train_one_epoch(run, rt, net, model, ema, teacher, optimizer, scheduler, data, cfg, epoch,
                               f"{out.name} epoch {epoch + 1}/{plan['epochs']}")
        best = _end_epoch(run, rt, out, model, ema, optimizer, scheduler, plan, base, best, epoch, sums,
                          (x_val, y_val, cfg), time.time() - epoch_started, epoch_started)
        epoch += 1
    if rt.is_main:
        (out / "best.json").write_text(json.dumps(best, indent=2))
    rt.barrier()
    return best


def _end_epoch(run, rt, out, model, ema, optimizer, scheduler, plan, base, best, epoch, sums, val, train_seconds,
               epoch_started) -> dict:
    """Validation of the epoch's network (the EMA's when on), its history row and plot, best.pt when it is the best
    so far, and last.pt: what a resume continues from. Returns the best epoch's figures."""
    x_val, y_val, cfg = val
    rt.average_buffers(model)
    if ema is not None:  # the average's BatchNorm statistics: the network's, the same on every rank
        with torch.no_grad():
            for e, b in zip(ema.buffers(), model.buffers()):
                e.copy_(b)
    scored = ema if ema is not None else model
    val_logits, m = validate(rt, scored, x_val, y_val, cfg)
    loss_total, kd_total, seen = rt.sum([sums["loss"], sums["kd"], sums["seen"]])
    row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "train_loss": loss_total / seen,
           "train_kd": kd_total / seen if base["teacher"] else "",
           "val_nll": F.cross_entropy(val_logits, torch.from_numpy(y_val)).item(),
           "val_accuracy": m["accuracy"], "val_balanced_accuracy": m["balanced_accuracy"],
           "val_macro_f1": m["macro_f1"], "val_weighted_f1": m["weighted_f1"],
           **{f"val_recall_{c}": v for c, v in m["per_class_recall"].items()},
           "images_per_s": round(sums["seen"] * rt.world / train_seconds, 1), "train_dtype": sums["dtype"],
           "seconds": round(time.time() - epoch_started, 2)}
    if m["macro_f1"] > best["val_macro_f1"]:
        best = {"epoch": epoch + 1, **{k: v for k, v in row.items() if k.startswith("val_")}}
        if rt.is_main:
            atomic_save({**base, "model": scored.state_dict(), "epoch": epoch, "val_metrics": m}, out / "best.pt")
    if rt.is_main:
        history = out / "history.csv"
        with open(history, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        plot_history(history, out / "history.png")
        print(f"{out.name} epoch {epoch + 1}/{plan['epochs']}: loss {row['train_loss']:.3f} val bal-acc "
              f"{m['balanced_accuracy']:.3f} macro-F1 {m['macro_f1']:.3f} ({row['seconds']} s, {sums['dtype']})",
              flush=True)
        atomic_save({**base, "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": torch.get_rng_state(), "epoch": epoch, "planned_epochs": plan["epochs"],
                     "budget_decided": plan["decided"], "best": best}, out / "last.pt")
    return best


def main(args: argparse.Namespace) -> dict:
    return train(TrainConfig.from_args(args))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
