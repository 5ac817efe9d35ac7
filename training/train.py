"""Train one network on HAM10000, optionally distilled from a frozen teacher.

    python -m training train --arch resnet18 --out runs/resnet18
    python -m training train --arch resnet18 --out runs/kd --teacher runs/resnet18/best.pt runs/resnet50/best.pt
"""
from __future__ import annotations

import argparse
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
from skinmodel.preprocessing import normalize
from training import data as D
from training.checkpoint import atomic_save, load_checkpoint, load_init_weights, load_teacher
from training.metrics import classification_metrics, predict_logits
from training.plots import plot_history
from training.recipe import augment_batch, class_weights_from_counts, kd_loss, make_augment, warmup_cosine


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
    return p


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(run: TrainConfig) -> dict:
    """Train (or resume) one run; returns the best epoch's validation figures (also in OUT/best.json)."""
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    run.data.use_threads()
    seed_everything(run.seed)
    split = D.load_split(run.data)
    D.write_splits(split.records, out / "splits.csv")
    train_set, val = split.part("train"), split.part("val")
    if run.max_train_images and run.max_train_images < len(train_set):
        train_set = random.Random(run.seed).sample(train_set, run.max_train_images)
    cfg = run.data.preprocess()
    x_train = D.build_cache(train_set, "train", cfg, run.data.cache, "decode train")
    y_train = torch.tensor([r.label for r in train_set])
    x_val = D.build_cache(val, "eval", cfg, run.data.cache, "decode val")
    y_val = np.array([r.label for r in val])
    weights = class_weights_from_counts(D.class_counts(train_set))

    model = build_model(run.arch, len(D.CLASS_NAMES))
    if run.init_weights:
        skipped = load_init_weights(model, run.init_weights)
        print(f"initialised from {run.init_weights} (re-initialised: {', '.join(skipped) or 'nothing'})")
    teacher = load_teacher(run.teacher, run.teacher_weights, run.teacher_arch, len(D.CLASS_NAMES), cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    steps_per_epoch = len(train_set) // run.batch_size or 1
    total, warmup = run.epochs * steps_per_epoch, int(run.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    start_epoch, best = 0, {"val_macro_f1": -1.0}
    if run.resume and (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        print(f"resumed from {out / 'last.pt'} at epoch {start_epoch}")

    augment = make_augment(cfg.crop_size)
    history_path = out / "history.csv"
    if start_epoch == 0 and history_path.exists():
        history_path.unlink()
    base = {"arch": run.arch, "class_names": list(D.CLASS_NAMES), "preprocessing": cfg.to_dict(),
            "split_hash": split.hash, "args": run.record(), "teacher": bool(teacher)}
    (out / "args.json").write_text(json.dumps(run.record(), indent=2))

    for epoch in range(start_epoch, run.epochs):
        model.train()
        started, seen, loss_sum, kd_sum = time.time(), 0, 0.0, 0.0
        order = torch.randperm(len(train_set))
        bar = tqdm(range(steps_per_epoch), desc=f"{out.name} epoch {epoch + 1}/{run.epochs}", unit="batch")
        for step in bar:
            idx = order[step * run.batch_size:(step + 1) * run.batch_size]
            x = normalize(augment_batch(x_train[idx], augment), cfg.mean, cfg.std)
            y = y_train[idx]
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)  # same augmented view as the student
                loss, kd, _ = kd_loss(logits, teacher_logits, y, run.alpha, run.temperature, weights)
                kd_sum += kd.item() * len(idx)
            else:
                loss = F.cross_entropy(logits, y, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")

        val_logits = predict_logits(model, x_val, cfg.mean, cfg.std)
        m = classification_metrics(y_val, val_logits.argmax(1).numpy(), D.CLASS_NAMES)
        row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "train_loss": loss_sum / seen,
               "train_kd": kd_sum / seen if teacher is not None else "",
               "val_nll": F.cross_entropy(val_logits, torch.from_numpy(y_val)).item(),
               "val_accuracy": m["accuracy"], "val_balanced_accuracy": m["balanced_accuracy"],
               "val_macro_f1": m["macro_f1"], "val_weighted_f1": m["weighted_f1"],
               **{f"val_recall_{c}": v for c, v in m["per_class_recall"].items()},
               "seconds": round(time.time() - started, 1)}
        with open(history_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        plot_history(history_path, out / "history.png")
        print(f"{out.name} epoch {epoch + 1}: loss {row['train_loss']:.3f} val bal-acc {m['balanced_accuracy']:.3f} "
              f"macro-F1 {m['macro_f1']:.3f} ({row['seconds']} s)", flush=True)
        if m["macro_f1"] > best["val_macro_f1"]:
            best = {"epoch": epoch + 1, **{k: v for k, v in row.items() if k.startswith("val_")}}
            atomic_save({**base, "model": model.state_dict(), "epoch": epoch, "val_metrics": m}, out / "best.pt")
        atomic_save({**base, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch,
                     "best": best}, out / "last.pt")
    (out / "best.json").write_text(json.dumps(best, indent=2))
    return best


def main(args: argparse.Namespace) -> dict:
    return train(TrainConfig.from_args(args))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
