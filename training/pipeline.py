"""The whole study, resumable: (recipe search) -> baselines -> teacher choice -> (grid) -> distilled student -> test
table -> export -> calibration -> abstention thresholds -> model card. Every step is called as a function with typed
settings.

    python -m training all                 # the real run (CPU: about 1.5 h at 96 px)
    python -m training all --quick --out /tmp/q   # tiny subset, tiny images: well under a minute
A training run whose best.json exists is skipped, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from skinmodel.release import ReleaseMeta
from stack.settings import MODEL_NAME
from training import data as D
from training.abstention import fit_abstention
from training.evaluate_release import evaluate_release
from training.calibrate import calibrate
from training.checkpoint import TTA_PREFIX, StudyError, checkpoint_preprocessing, models_from_spec, teacher_spec
from training.device import add_device_args, resolve_device
from training.evaluate import evaluate
from training.export import export
from training.grid import ALPHAS, TEMPERATURES, grid_search
from training.metrics import classification_metrics, predict_logits
from training.model_card import SERVED_TEST, write_model_card
from training.subgroups import render_subgroups
from training.recipe_search import search_recipe, variants
from training.train import RECIPE_FIELDS, TrainConfig, add_recipe_args, train


@dataclass
class StudyConfig:
    out: str = "runs/study"
    data: D.DataConfig = field(default_factory=D.DataConfig)
    epochs_resnet18: int = 20
    epochs_resnet50: int = 12
    epochs_kd: int = 20
    batch_size: int = 64
    seed: int = 0
    alpha: float = 0.5           # KD alpha and temperature when no grid is run
    temperature: float = 4.0
    grid: bool = False
    grid_alphas: list[float] = field(default_factory=lambda: list(ALPHAS))
    grid_temps: list[float] = field(default_factory=lambda: list(TEMPERATURES))
    grid_epochs: int = 3
    grid_max_train_images: int | None = None
    class_weighting: str = "inverse"  # the recipe every run shares (training/recipe.py, TrainConfig)
    label_smoothing: float = 0.0
    ema: float = 0.0
    mix: str = "none"
    mix_alpha: float = 1.0
    teacher_tta: bool = False         # teacher candidates also averaged over their 8 dihedral views
    recipe_search: bool = False       # choose class weighting x mix on validation first (training/recipe_search.py)
    recipe_variants: int | None = None  # the first N of the search space (smoke runs)
    device: str = "auto"
    time_budget: float | None = None  # seconds for all training runs together, shared as in BUDGET_SHARES
    release_dir: str | None = None  # default: OUT/release
    name: str = MODEL_NAME
    version: str = "1.0"
    command: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "StudyConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"data", "command", "recipe_variants"}
        study = cls(data=D.DataConfig.from_args(args), **{k: getattr(args, k) for k in names})
        return study.quick() if args.quick else study

    def quick(self) -> "StudyConfig":
        """A smoke run: 12 images per class, 32 px, one epoch per run, a 2 x 2 grid."""
        return dataclasses.replace(
            self, data=dataclasses.replace(self.data, limit_per_class=self.data.limit_per_class or 12, img_size=32),
            epochs_resnet18=1, epochs_resnet50=1, epochs_kd=1, grid_epochs=1, batch_size=8, recipe_variants=2,
            grid_alphas=self.grid_alphas[:2], grid_temps=self.grid_temps[:2])


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(description="Run the whole HAM10000 study end to end (resumable).", add_help=add_help)
    D.add_data_args(p)
    p.add_argument("--out", default=d.out, help="study folder (one subfolder per run)")
    p.add_argument("--epochs-resnet18", type=int, default=d.epochs_resnet18)
    p.add_argument("--epochs-resnet50", type=int, default=d.epochs_resnet50)
    p.add_argument("--epochs-kd", type=int, default=d.epochs_kd)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--alpha", type=float, default=d.alpha, help="KD alpha when no grid is run")
    p.add_argument("--temperature", type=float, default=d.temperature, help="KD temperature when no grid is run")
    p.add_argument("--grid", action="store_true", help="choose alpha x T by a grid search on validation")
    p.add_argument("--grid-alphas", type=float, nargs="+", default=d.grid_alphas)
    p.add_argument("--grid-temps", type=float, nargs="+", default=d.grid_temps)
    p.add_argument("--grid-epochs", type=int, default=d.grid_epochs)
    p.add_argument("--grid-max-train-images", type=int, default=None)
    add_recipe_args(p)
    p.add_argument("--recipe-search", action="store_true",
                   help="first choose class weighting x mix on validation with short ResNet18 runs (grid budget); "
                        "every later run uses the winner")
    p.add_argument("--teacher-tta", action="store_true",
                   help="also consider every teacher averaged over its 8 flipped/rotated views (8x its cost in "
                        "distillation); chosen only if it wins on validation")
    add_device_args(p)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall time for all training runs together (each run's share sizes its epochs, at most the "
                        "--epochs-* given); evaluation, calibration and the gate come on top")
    p.add_argument("--release-dir", default=None, help="export the distilled student here (default: OUT/release)")
    p.add_argument("--name", default=d.name)
    p.add_argument("--version", default=d.version)
    p.add_argument("--quick", action="store_true", help="smoke run: 12 images per class, 32 px, 1 epoch each")
    return p


BUDGET_SHARES = {"recipe": 0.15, "resnet18": 0.2, "resnet50": 0.25, "grid": 0.2, "kd": 0.35}


class Budget:
    """Each training step's seconds of a study's time budget (shares of the steps that do not run go to the others).
    A run gets its share, but never more than the time left before the study's deadline minus the shares of the
    runs still to come: a run that overran (every run takes at least two epochs) is paid for by the later ones,
    not by the steps after training."""

    def __init__(self, total: float | None, steps, clock=time.time):
        self.keys = [k for k in BUDGET_SHARES if k in steps]
        weight = sum(BUDGET_SHARES[k] for k in self.keys)
        self.share = {k: (total or 0) * BUDGET_SHARES[k] / weight for k in self.keys}
        self.clock = clock
        self.deadline = clock() + total if total else None

    def __call__(self, key: str) -> float | None:
        if self.deadline is None:
            return None
        later = sum(self.share[k] for k in self.keys[self.keys.index(key) + 1:])
        return max(1.0, min(self.share[key], self.deadline - self.clock() - later))


def epochs_run(run_dir: Path) -> int:
    """How many epochs a finished run trained (its history's rows; train.py drops rows a resume repeats)."""
    with open(run_dir / "history.csv") as f:
        return sum(1 for _ in f) - 1


def train_once(run: TrainConfig) -> dict:
    done = Path(run.out) / "best.json"
    if done.exists():
        print(f"[skip] {run.out} is complete")
        return json.loads(done.read_text())
    print(f"[run] {run.arch} -> {run.out}", flush=True)
    return train(dataclasses.replace(run, resume=True))


def choose_teacher(data: D.DataConfig, candidates: dict[str, list[str]], device: str = "auto",
                   tta: bool = False) -> tuple[str, str, dict]:
    """Pick the teacher with the best validation macro-F1 among trained checkpoints and their ensemble (and, with
    tta, each of them averaged over its 8 dihedral views). Returns (name, spec for models_from_spec, scores)."""
    dev = resolve_device(device)
    val = D.load_split(data).part("val")
    y = np.array([r.label for r in val])
    specs = {name: teacher_spec(paths) for name, paths in candidates.items()}
    if tta:
        specs.update({f"{name} + TTA": teacher_spec(paths, tta=True) for name, paths in candidates.items()})
    scores = {}
    for name, spec in specs.items():
        model, ckpt = models_from_spec(spec)
        cfg = checkpoint_preprocessing(ckpt)
        x = D.build_cache(val, "eval", cfg, data.cache, "decode val")
        logits = predict_logits(model.to(dev), x, cfg.mean, cfg.std)
        m = classification_metrics(y, logits.argmax(1).numpy(), D.CLASS_NAMES)
        scores[name] = {"val_macro_f1": m["macro_f1"], "val_balanced_accuracy": m["balanced_accuracy"]}
        print(f"teacher candidate {name:24} val macro-F1 {m['macro_f1']:.3f} bal-acc {m['balanced_accuracy']:.3f}")
    best = max(scores, key=lambda k: scores[k]["val_macro_f1"])
    return best, specs[best], scores


def run_study(study: StudyConfig, after_training=None) -> ReleaseMeta:
    """Every step in order; after_training() is called once the last network is trained (the accelerator run
    sends the student back from there, before the steps a CPU could redo)."""
    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StudyError("the whole study runs in one process: under torchrun, run `python -m training train` "
                         "steps (the study's evaluation and export steps are not sharded)")
    data = study.data
    data.use_threads()
    steps = {"resnet18", "resnet50", "kd"} | ({"grid"} if study.grid else set()) | (
        {"recipe"} if study.recipe_search else set())
    budget = Budget(study.time_budget, steps)
    recipe = {k: getattr(study, k) for k in RECIPE_FIELDS}
    if study.recipe_search:
        base = TrainConfig(out="", data=data, arch="resnet18", epochs=study.grid_epochs, batch_size=study.batch_size,
                           seed=study.seed, device=study.device, max_train_images=study.grid_max_train_images,
                           **recipe)
        recipe.update(search_recipe(data, out / "recipe", base, variants(limit=study.recipe_variants),
                                    budget("recipe")))
    common = dict(data=data, batch_size=study.batch_size, seed=study.seed, device=study.device, **recipe)
    runs = {"resnet18": out / "resnet18", "resnet50": out / "resnet50", "kd": out / "resnet18_kd"}
    train_once(TrainConfig(out=str(runs["resnet18"]), arch="resnet18", epochs=study.epochs_resnet18,
                           time_budget=budget("resnet18"), **common))
    train_once(TrainConfig(out=str(runs["resnet50"]), arch="resnet50", epochs=study.epochs_resnet50,
                           time_budget=budget("resnet50"), **common))
    r18, r50 = str(runs["resnet18"] / "best.pt"), str(runs["resnet50"] / "best.pt")
    teacher_name, spec, scores = choose_teacher(
        data, {"resnet18": [r18], "resnet50": [r50], "resnet18+resnet50": [r18, r50]}, study.device, study.teacher_tta)
    teacher, teacher_tta = spec.removeprefix(TTA_PREFIX).split("+"), spec.startswith(TTA_PREFIX)
    alpha, temperature = study.alpha, study.temperature
    if study.grid:
        cells = len(study.grid_alphas) * len(study.grid_temps)
        chosen = grid_search(data, out / "grid", teacher, study.grid_alphas, study.grid_temps, epochs=study.grid_epochs,
                             max_train_images=study.grid_max_train_images, batch_size=study.batch_size,
                             seed=study.seed, device=study.device, teacher_tta=teacher_tta, recipe=recipe,
                             time_budget=budget("grid") / cells if study.time_budget else None)
        alpha, temperature = chosen["alpha"], chosen["temperature"]
    (out / "teacher.json").write_text(json.dumps({"chosen": teacher_name, "checkpoints": teacher, "tta": teacher_tta,
                                                  "candidates": scores,
                                                  "alpha": alpha, "temperature": temperature}, indent=2))
    # Under a time budget the student gets as many epochs as the ResNet18 trained without a teacher, at most:
    # "distillation helps" is then a comparison at equal epochs, not at equal seconds.
    epochs_kd = min(study.epochs_kd, epochs_run(runs["resnet18"])) if study.time_budget else study.epochs_kd
    train_once(TrainConfig(out=str(runs["kd"]), arch="resnet18", epochs=epochs_kd, teacher=teacher,
                           teacher_tta=teacher_tta,
                           alpha=alpha, temperature=temperature, time_budget=budget("kd"), **common))
    student = str(runs["kd"] / "best.pt")
    if after_training:
        try:
            after_training()
        except Exception as err:  # noqa: BLE001 - sending a copy early must not stop the study that trained
            print(f"could not send the student back early: {err}", flush=True)

    report_dir = out / "report"
    evaluate(data, {"resnet18 (scratch)": r18, "resnet50 (scratch)": r50,
                    f"teacher: {teacher_name}": spec, "resnet18 distilled": student},
             report_dir, command=study.command, device=study.device)
    release = Path(study.release_dir) if study.release_dir else out / "release"
    export(student, release, study.name, study.version, str(report_dir / "results.json"), "resnet18 distilled",
           command=study.command)
    calibrate(student, release, data, study.device)
    fit_abstention(release, data, device=study.device)
    # The release as served, on the test split with its metadata: the subgroup tables of the report and card.
    try:
        served = evaluate_release(release, str(D.resolve_data_dir(data.data)), release / SERVED_TEST, "test",
                                  data.split_seed, data.limit_per_class)
    except D.DataError as err:  # e.g. a smoke run whose test split lacks a class: the release itself is fine
        print(f"no served test report: {err}")
        served = None
    except ModuleNotFoundError as err:  # a GPU box without TorchServe's Python package: keep the trained release
        if err.name != "ts":
            raise
        print(f"no served test report: TorchServe's Python package is not installed here. Where it is: "
              f"python -m training evaluate --release {release} --data HAM10000_DIR --split test "
              f"--out {release / SERVED_TEST}", flush=True)
        served = None
    for png in report_dir.glob("*.png"):
        shutil.copy(png, release / png.name)
    for key, run in runs.items():  # every run's per-epoch CSV and plot travel with the release
        for name in ("history.csv", "history.png"):
            shutil.copy(run / name, release / name.replace("history", f"history_{key}"))
    shutil.copy(out / "teacher.json", release / "teacher.json")
    for src, dst in (("recipe/recipe.csv", "recipe.csv"), ("recipe/recipe.json", "recipe.json"),
                     ("grid/grid.csv", "kd_grid.csv"), ("grid/grid.png", "kd_grid.png"), ("report/report.md", "report.md"),
                     ("report/results.json", "results.json")):
        if (out / src).exists():
            shutil.copy(out / src, release / dst)
    if served:
        append_subgroups(release / "report.md", served)
    write_model_card(release)
    print(f"release model: {release}")
    return ReleaseMeta.load(release)


SUBGROUP_TITLE = "Subgroups of the release (distilled ResNet18, as served)"
SUBGROUP_TITLE_MD = f"## {SUBGROUP_TITLE}"


def append_subgroups(report: Path, served: dict) -> None:
    """The study's test report gains the served release's subgroup tables (replacing an earlier run's)."""
    text = report.read_text() if report.exists() else ""
    text = text.split(SUBGROUP_TITLE_MD)[0].rstrip("\n")
    report.write_text(f"{text}\n\n{render_subgroups(served['subgroups'], SUBGROUP_TITLE)}\n"
                      f"(`{SERVED_TEST}/report.md`: the release as served on the test split, verdicts included.)\n")


def main(args: argparse.Namespace) -> ReleaseMeta:
    study = StudyConfig.from_args(args)
    study.command = "python -m training all " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["all"] else [])
    return run_study(study)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
