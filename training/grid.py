"""Distillation grid search over alpha x T with a per-run budget; selection on the validation split only. Every cell
resumes at its last epoch when interrupted (training.train.run_or_resume)."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

from training import data as D
from training.device import add_device_args
from training.plots import plot_grid
from training.train import RECIPE_FIELDS, TrainConfig, add_recipe_args, run_or_resume

ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)
TEMPERATURES = (1.0, 5.0, 10.0, 15.0, 20.0)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Grid search of distillation alpha x temperature (val macro-F1).",
                                add_help=add_help)
    D.add_data_args(p)
    p.add_argument("--out", required=True, help="grid folder: one run per cell, grid.csv, grid.png")
    p.add_argument("--teacher", nargs="+", required=True, help="teacher checkpoint(s)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    p.add_argument("--temps", type=float, nargs="+", default=list(TEMPERATURES))
    p.add_argument("--epochs", type=int, default=3, help="per-run budget in epochs")
    p.add_argument("--max-train-images", type=int, default=None, help="per-run budget in training images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-tta", action="store_true", help="the teacher averages its 8 dihedral views")
    add_recipe_args(p)
    add_device_args(p)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall time per cell (sizes its epochs, at most --epochs)")
    return p


def cell_config(base: TrainConfig, out: Path, alpha: float, temperature: float) -> TrainConfig:
    return dataclasses.replace(base, out=str(Path(out) / f"a{alpha:g}_t{temperature:g}"), alpha=alpha,
                               temperature=temperature, resume=True)


def grid_search(base: TrainConfig, out: Path, alphas=ALPHAS, temps=TEMPERATURES) -> dict:
    """One short distillation run per (alpha, T) cell, `base` giving everything else (teacher, epochs, recipe);
    each cell resumed or skipped when complete (training.train.run_or_resume). The best cell on validation
    macro-F1 is returned and written to OUT/chosen.json, with grid.csv and grid.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores, rows = {}, []
    for alpha in alphas:
        for temperature in temps:
            best = run_or_resume(cell_config(base, out, alpha, temperature))
            scores[(alpha, temperature)] = best["val_macro_f1"]
            rows.append({"alpha": alpha, "temperature": temperature, "val_macro_f1": best["val_macro_f1"],
                         "val_balanced_accuracy": best["val_balanced_accuracy"], "best_epoch": best["epoch"]})
    with open(out / "grid.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_grid(list(alphas), list(temps), scores, out / "grid.png")
    alpha, temperature = max(scores, key=scores.get)
    chosen = {"alpha": alpha, "temperature": temperature, "val_macro_f1": scores[(alpha, temperature)]}
    (out / "chosen.json").write_text(json.dumps(chosen, indent=2))
    print(f"grid: best alpha={alpha:g} T={temperature:g} (val macro-F1 {chosen['val_macro_f1']:.3f})")
    return chosen


def main(args: argparse.Namespace) -> dict:
    base = TrainConfig(out="", data=D.DataConfig.from_args(args), arch=args.arch, epochs=args.epochs,
                       batch_size=args.batch_size, seed=args.seed, max_train_images=args.max_train_images,
                       teacher=list(args.teacher), teacher_tta=args.teacher_tta, device=args.device,
                       precision=args.precision, time_budget=args.time_budget,
                       **{k: getattr(args, k) for k in RECIPE_FIELDS})
    return grid_search(base, Path(args.out), args.alphas, args.temps)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
