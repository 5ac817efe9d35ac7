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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from handler.architectures import ARCHITECTURES, build_model
from handler.preprocessing import PreprocessConfig, normalize
from training import data as D
from training.checkpoint import atomic_save, load_checkpoint, load_init_weights, load_teacher
from training.engine import (augment_batch, class_weights_from_counts, classification_metrics, kd_loss,
                             make_augment, predict_logits, warmup_cosine)
from training.plots import plot_history

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="HAM10000 folder (default: $HAM10000_DIR, else ../shared/data/ham10000)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the lesion-grouped split")
    p.add_argument("--limit-per-class", type=int, default=None, help="use at most N images per class (smoke runs)")
    p.add_argument("--img-size", type=int, default=96, help="input (crop) size in pixels")
    p.add_argument("--resize-size", type=int, default=None, help="shorter side before the crop (default: img-size)")
    p.add_argument("--cache-dir", default="runs/cache", help="where decoded uint8 tensors are kept between runs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train one model on HAM10000 (optionally with a distillation teacher).",
                                add_help=add_help)
    add_data_args(p)
    p.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    p.add_argument("--out", required=True, help="run folder: checkpoints, history.csv, history.png")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-images", type=int, default=None, help="budget: train on a random subset of N images")
    p.add_argument("--init-weights", help="state_dict to start from (e.g. local ImageNet weights; the head is skipped)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    kd = p.add_argument_group("distillation")
    kd.add_argument("--teacher", nargs="*", default=[], help="teacher checkpoint(s); several are averaged")
    kd.add_argument("--teacher-weights", help="teacher as a plain 7-class state_dict file (needs --teacher-arch)")
    kd.add_argument("--teacher-arch", choices=ARCHITECTURES)
    kd.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term (1 - alpha on cross-entropy)")
    kd.add_argument("--temperature", type=float, default=4.0)
    return p


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_split(args) -> tuple[list[D.Record], str]:
    records = D.split_records(D.load_records(D.resolve_data_dir(args.data), args.limit_per_class), args.split_seed)
    split_hash = D.write_splits(records, Path(args.out) / "splits.csv")
    return records, split_hash


def preprocess_config(args) -> PreprocessConfig:
    return PreprocessConfig(args.resize_size or args.img_size, args.img_size, IMAGENET_MEAN, IMAGENET_STD)


def main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    records, split_hash = prepare_split(args)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if args.max_train_images and args.max_train_images < len(train):
        train = random.Random(args.seed).sample(train, args.max_train_images)
    cfg = preprocess_config(args)
    cache = Path(args.cache_dir) if args.cache_dir else None
    x_train = D.build_cache(train, "train", cfg, cache, "decode train")
    y_train = torch.tensor([r.label for r in train])
    x_val = D.build_cache(val, "eval", cfg, cache, "decode val")
    y_val = np.array([r.label for r in val])
    weights = class_weights_from_counts(D.class_counts(train))

    model = build_model(args.arch, len(D.CLASS_NAMES))
    if args.init_weights:
        skipped = load_init_weights(model, args.init_weights)
        print(f"initialised from {args.init_weights} (re-initialised: {', '.join(skipped) or 'nothing'})")
    teacher = load_teacher(args.teacher, args.teacher_weights, args.teacher_arch, len(D.CLASS_NAMES), cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train) // args.batch_size or 1
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    start_epoch, best = 0, {"val_macro_f1": -1.0}
    if args.resume and (out / "last.pt").exists():
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
    base = {"arch": args.arch, "class_names": list(D.CLASS_NAMES), "preprocessing": dataclasses.asdict(cfg),
            "split_hash": split_hash, "args": vars(args), "teacher": bool(teacher)}
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))

    for epoch in range(start_epoch, args.epochs):
        model.train()
        started, seen, loss_sum, kd_sum = time.time(), 0, 0.0, 0.0
        order = torch.randperm(len(train))
        bar = tqdm(range(steps_per_epoch), desc=f"{out.name} epoch {epoch + 1}/{args.epochs}", unit="batch")
        for step in bar:
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = normalize(augment_batch(x_train[idx], augment), cfg.mean, cfg.std)
            y = y_train[idx]
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)  # same augmented view as the student
                loss, kd, _ = kd_loss(logits, teacher_logits, y, args.alpha, args.temperature, weights)
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


if __name__ == "__main__":
    main(get_args_parser().parse_args())
