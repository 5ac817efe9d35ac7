"""The whole study, resumable: baselines -> teacher choice -> (grid) -> distilled student -> test table -> export.

    python -m training all                 # the real run (CPU: about 1.5 h at 96 px)
    python -m training all --quick --out /tmp/q   # tiny subset, tiny images: well under a minute
A step whose best.json exists is skipped, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from handler.architectures import ProbabilityEnsemble
from handler.preprocessing import PreprocessConfig
from training import data as D
from training import calibrate, evaluate, export, grid, model_card, trust
from training import train as T
from training.checkpoint import model_from_checkpoint
from training.engine import classification_metrics, predict_logits


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the whole HAM10000 study end to end (resumable).", add_help=add_help)
    T.add_data_args(p)
    p.add_argument("--out", default="runs/study", help="study folder (one subfolder per run)")
    p.add_argument("--epochs-resnet18", type=int, default=20)
    p.add_argument("--epochs-resnet50", type=int, default=12)
    p.add_argument("--epochs-kd", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.5, help="KD alpha when no grid is run")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature when no grid is run")
    p.add_argument("--grid", action="store_true", help="choose alpha x T by a grid search on validation")
    p.add_argument("--grid-alphas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--grid-temps", type=float, nargs="+", default=[1, 5, 10, 15, 20])
    p.add_argument("--grid-epochs", type=int, default=3)
    p.add_argument("--grid-max-train-images", type=int, default=None)
    p.add_argument("--release-dir", default=None, help="export the distilled student here (default: OUT/release)")
    p.add_argument("--name", default="skin-lesion")
    p.add_argument("--version", default="1.0")
    p.add_argument("--quick", action="store_true", help="smoke run: 12 images per class, 32 px, 1 epoch each")
    return p


def apply_quick(args) -> None:
    args.limit_per_class, args.img_size = args.limit_per_class or 12, 32
    args.epochs_resnet18 = args.epochs_resnet50 = args.epochs_kd = args.grid_epochs = 1
    args.batch_size = 8
    args.grid_alphas, args.grid_temps = args.grid_alphas[:2], args.grid_temps[:2]


def common_argv(args) -> list[str]:
    argv = ["--img-size", str(args.img_size), "--split-seed", str(args.split_seed), "--cache-dir", args.cache_dir,
            "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    for flag, value in (("--data", args.data), ("--limit-per-class", args.limit_per_class),
                        ("--resize-size", args.resize_size), ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def train_once(run_dir: Path, argv: list[str]) -> dict:
    if (run_dir / "best.json").exists():
        print(f"[skip] {run_dir} is complete")
        return json.loads((run_dir / "best.json").read_text())
    print(f"[run] python -m training train {shlex.join(argv)}", flush=True)
    return T.main(T.get_args_parser().parse_args(argv + ["--resume"]))


def choose_teacher(args, candidates: dict[str, list[str]]) -> tuple[str, list[str], dict]:
    """Pick the teacher with the best validation macro-F1 among trained checkpoints and their ensemble."""
    records = D.split_records(D.load_records(D.resolve_data_dir(args.data), args.limit_per_class), args.split_seed)
    val = [r for r in records if r.split == "val"]
    y = np.array([r.label for r in val])
    scores = {}
    for name, paths in candidates.items():
        models = [model_from_checkpoint(p) for p in paths]
        ckpt = models[0][1]
        cfg = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["preprocessing"].items()})
        x = D.build_cache(val, "eval", cfg, Path(args.cache_dir), "decode val")
        model = models[0][0] if len(models) == 1 else ProbabilityEnsemble([m for m, _ in models]).eval()
        m = classification_metrics(y, predict_logits(model, x, cfg.mean, cfg.std).argmax(1).numpy(), D.CLASS_NAMES)
        scores[name] = {"val_macro_f1": m["macro_f1"], "val_balanced_accuracy": m["balanced_accuracy"]}
        print(f"teacher candidate {name:18} val macro-F1 {m['macro_f1']:.3f} bal-acc {m['balanced_accuracy']:.3f}")
    best = max(scores, key=lambda k: scores[k]["val_macro_f1"])
    return best, candidates[best], scores


def main(args) -> dict:
    if args.quick:
        apply_quick(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m training all " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["all"] else [])
    base = common_argv(args)
    runs = {"resnet18": out / "resnet18", "resnet50": out / "resnet50", "kd": out / "resnet18_kd"}
    train_once(runs["resnet18"], ["--arch", "resnet18", "--out", str(runs["resnet18"]),
                                  "--epochs", str(args.epochs_resnet18), *base])
    train_once(runs["resnet50"], ["--arch", "resnet50", "--out", str(runs["resnet50"]),
                                  "--epochs", str(args.epochs_resnet50), *base])
    r18, r50 = str(runs["resnet18"] / "best.pt"), str(runs["resnet50"] / "best.pt")
    teacher_name, teacher, scores = choose_teacher(
        args, {"resnet18": [r18], "resnet50": [r50], "resnet18+resnet50": [r18, r50]})
    alpha, temperature = args.alpha, args.temperature
    if args.grid:
        chosen = grid.main(grid.get_args_parser().parse_args(
            ["--out", str(out / "grid"), "--teacher", *teacher, "--epochs", str(args.grid_epochs),
             "--alphas", *map(str, args.grid_alphas), "--temps", *map(str, args.grid_temps), *base]
            + (["--max-train-images", str(args.grid_max_train_images)] if args.grid_max_train_images else [])))
        alpha, temperature = chosen["alpha"], chosen["temperature"]
    (out / "teacher.json").write_text(json.dumps({"chosen": teacher_name, "checkpoints": teacher, "candidates": scores,
                                                  "alpha": alpha, "temperature": temperature}, indent=2))
    train_once(runs["kd"], ["--arch", "resnet18", "--out", str(runs["kd"]), "--epochs", str(args.epochs_kd),
                            "--teacher", *teacher, "--alpha", str(alpha), "--temperature", str(temperature), *base])

    report_dir = out / "report"
    eval_argv = ["--out", str(report_dir), "--split-seed", str(args.split_seed), "--cache-dir", args.cache_dir,
                 "--model", f"resnet18 (scratch)={r18}", "--model", f"resnet50 (scratch)={r50}",
                 "--model", f"teacher: {teacher_name}={'+'.join(teacher)}",
                 "--model", f"resnet18 distilled={runs['kd'] / 'best.pt'}", "--command", command]
    for flag, value in (("--data", args.data), ("--limit-per-class", args.limit_per_class)):
        if value is not None:
            eval_argv += [flag, str(value)]
    evaluate.main(evaluate.get_args_parser().parse_args(eval_argv))

    release = Path(args.release_dir) if args.release_dir else out / "release"
    meta = export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(runs["kd"] / "best.pt"), "--out", str(release), "--name", args.name,
         "--version", args.version, "--results", str(report_dir / "results.json"),
         "--results-key", "resnet18 distilled", "--command", command]))
    calibration = calibrate.main(calibrate.get_args_parser().parse_args(
        ["--checkpoint", str(runs["kd"] / "best.pt"), "--release", str(release), "--split-seed", str(args.split_seed),
         "--cache-dir", args.cache_dir]
        + [x for flag, v in (("--data", args.data), ("--limit-per-class", args.limit_per_class)) if v is not None
           for x in (flag, str(v))]))
    meta["temperature"], meta["calibration"] = calibration["temperature"], calibration
    data_argv = ["--split-seed", str(args.split_seed), "--cache-dir", args.cache_dir] + [
        x for flag, v in (("--data", args.data), ("--limit-per-class", args.limit_per_class)) if v is not None
        for x in (flag, str(v))]
    trust.main(trust.get_args_parser().parse_args(["--checkpoint", str(runs["kd"] / "best.pt"), "--release",
                                                   str(release), *data_argv]))
    for png in report_dir.glob("*.png"):
        shutil.copy(png, release / png.name)
    for key, run in runs.items():  # every run's per-epoch CSV and plot travel with the release
        for name in ("history.csv", "history.png"):
            shutil.copy(run / name, release / name.replace("history", f"history_{key}"))
    shutil.copy(out / "teacher.json", release / "teacher.json")
    if (out / "grid" / "grid.csv").exists():
        shutil.copy(out / "grid" / "grid.csv", release / "kd_grid.csv")
    for name in ("report.md", "results.json"):
        shutil.copy(report_dir / name, release / name)
    if (out / "grid" / "grid.png").exists():
        shutil.copy(out / "grid" / "grid.png", release / "kd_grid.png")
    model_card.main(model_card.get_args_parser().parse_args(["--release", str(release)]))
    print(f"release model: {release}")
    return meta


if __name__ == "__main__":
    main(get_args_parser().parse_args())
