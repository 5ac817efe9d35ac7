"""Distillation grid search over alpha x T with a per-run budget; selection on the validation split only."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from training import train as T
from training.plots import plot_grid


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Grid search of distillation alpha x temperature (val macro-F1).",
                                add_help=add_help)
    T.add_data_args(p)
    p.add_argument("--out", required=True, help="grid folder: one run per cell, grid.csv, grid.png")
    p.add_argument("--teacher", nargs="+", required=True, help="teacher checkpoint(s)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--temps", type=float, nargs="+", default=[1, 5, 10, 15, 20])
    p.add_argument("--epochs", type=int, default=3, help="per-run budget in epochs")
    p.add_argument("--max-train-images", type=int, default=None, help="per-run budget in training images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p


def run_args(args, alpha: float, temperature: float) -> list[str]:
    argv = ["--arch", args.arch, "--out", str(Path(args.out) / f"a{alpha:g}_t{temperature:g}"),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--img-size", str(args.img_size), "--split-seed", str(args.split_seed), "--cache-dir", args.cache_dir,
            "--alpha", str(alpha), "--temperature", str(temperature), "--teacher", *args.teacher]
    for flag, value in (("--data", args.data), ("--limit-per-class", args.limit_per_class),
                        ("--resize-size", args.resize_size), ("--max-train-images", args.max_train_images),
                        ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores, rows = {}, []
    for alpha in args.alphas:
        for temperature in args.temps:
            run_argv = run_args(args, alpha, temperature)
            done = Path(run_argv[run_argv.index("--out") + 1]) / "best.json"
            best = json.loads(done.read_text()) if done.exists() else T.main(T.get_args_parser().parse_args(run_argv))
            scores[(alpha, temperature)] = best["val_macro_f1"]
            rows.append({"alpha": alpha, "temperature": temperature, "val_macro_f1": best["val_macro_f1"],
                         "val_balanced_accuracy": best["val_balanced_accuracy"], "best_epoch": best["epoch"]})
    with open(out / "grid.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_grid(args.alphas, args.temps, scores, out / "grid.png")
    alpha, temperature = max(scores, key=scores.get)
    chosen = {"alpha": alpha, "temperature": temperature, "val_macro_f1": scores[(alpha, temperature)]}
    (out / "chosen.json").write_text(json.dumps(chosen, indent=2))
    print(f"grid: best alpha={alpha:g} T={temperature:g} (val macro-F1 {chosen['val_macro_f1']:.3f})")
    return chosen


if __name__ == "__main__":
    main(get_args_parser().parse_args())
