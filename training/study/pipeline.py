"""The whole study, resumable: (recipe search) -> baselines -> teacher choice -> (grid) -> distilled student -> test
table -> export -> calibration -> dermoscopy check -> model card. Every step is called as a function with typed
settings.

    python -m training all                 # the real run (CPU: about 1.5 h at 96 px)
    python -m training all --quick --out /tmp/q   # tiny subset, tiny images: well under a minute
    python -m training all --resume ...    # continue an interrupted study (same settings: checked)
    python -m training status --out runs/study    # where a study stands, and its ETA

Every network trains through training.network.train.run_or_resume: a finished run is read back, an interrupted one
continues at its last epoch. The steps after training record themselves in OUT/progress.json and are skipped
when done. OUT/study.json holds the settings and the commit of the code that runs the study.
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

from skinmodel.release import MODEL_NAME, ReleaseMeta
from training.common import data as D
from training.dermoscopy.check import fit_dermoscopy_check
from training.evaluation.evaluate_release import evaluate_release
from training.release.calibrate import calibrate
from training.common.checkpoint import (TTA_PREFIX, StudyError, checkpoint_preprocessing, load_checkpoint, models_from_spec,
                                 teacher_spec)
from training.common.device import add_device_args, resolve_device
from training.evaluation.evaluate import evaluate
from training.release.export import export, git_sha
from training.study.grid import ALPHAS, TEMPERATURES, grid_search
from training.common.metrics import classification_metrics, predict_logits
from training.release.model_card import SERVED_TEST, write_model_card
from training.evaluation.subgroups import render_subgroups
from training.study.recipe_search import SIZES, equal_compute_epochs, search_recipe, stages
from training.network.recipe import Recipe
from training.network.train import TrainConfig, add_recipe_args, run_or_resume


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
    recipe: Recipe = field(default_factory=Recipe)  # what every run shares (the recipe search may change it)
    teacher_tta: bool = False         # teacher candidates also averaged over their 8 dihedral views
    max_teacher_cost: float | None = None  # eligible teachers add at most this many ResNet18 steps per KD step
    recipe_search: bool = False       # choose class weighting x mix on validation first (training/study/recipe_search.py)
    recipe_epochs: int = 10           # each recipe-search run's epochs at the first size (others: equal compute)
    recipe_variants: int | None = None  # each stage cut to its first N values (smoke runs)
    recipe_sizes: list[int] = field(default_factory=lambda: list(SIZES))  # input sizes the search compares
    equal_compute: bool = False       # --epochs-* and --grid-epochs count at recipe_sizes[0]; scaled to the chosen size
    device: str = "auto"
    precision: str = "auto"
    time_budget: float | None = None  # seconds for all training runs together, shared as in BUDGET_SHARES
    release_dir: str | None = None  # default: OUT/release
    name: str = MODEL_NAME
    version: str = "1.0"
    command: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "StudyConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"data", "recipe", "command", "recipe_variants", "recipe_sizes"}
        study = cls(data=D.DataConfig.from_args(args), recipe=Recipe.from_args(args),
                    **{k: getattr(args, k) for k in names})
        return study.quick() if args.quick else study

    def quick(self) -> "StudyConfig":
        """A smoke run: 12 images per class, 32 px, one epoch per run, a 2 x 2 grid."""
        return dataclasses.replace(
            self, data=dataclasses.replace(self.data, limit_per_class=self.data.limit_per_class or 12, img_size=32),
            epochs_resnet18=1, epochs_resnet50=min(1, self.epochs_resnet50), epochs_kd=1, grid_epochs=1, batch_size=8, recipe_variants=2,
            recipe_epochs=1, recipe_sizes=[32, 40],
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
                   help="first choose input size, colour constancy, EMA, class weighting x mix on validation with "
                        "short ResNet18 runs (training/study/recipe_search.py); every later run uses the winners")
    p.add_argument("--recipe-epochs", type=int, default=d.recipe_epochs,
                   help="epochs of each recipe-search run at the first size searched, 128 px (other sizes get the "
                        "same compute: epochs x pixels)")
    p.add_argument("--equal-compute", action="store_true",
                   help="--epochs-* and --grid-epochs are counted at the first size searched (128 px): a run at "
                        "another input size gets the same compute (epochs x pixels)")
    p.add_argument("--max-teacher-cost", type=float, default=None, metavar="STEPS",
                   help="only teachers whose forward passes add at most this many ResNet18 training steps to each "
                        "distillation step can be chosen (all are scored and recorded); e.g. 2 rules out TTA teachers")
    p.add_argument("--teacher-tta", action="store_true",
                   help="also consider every teacher averaged over its 8 flipped/rotated views (8x its cost in "
                        "distillation); chosen only if it wins on validation")
    add_device_args(p)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall time for all training runs together (each run's share sizes its epochs, at most the "
                        "--epochs-* given); evaluation, calibration and the dermoscopy check come on top")
    p.add_argument("--release-dir", default=None, help="export the distilled student here (default: OUT/release)")
    p.add_argument("--name", default=d.name)
    p.add_argument("--version", default=d.version)
    p.add_argument("--quick", action="store_true", help="smoke run: 12 images per class, 32 px, 1 epoch each")
    p.add_argument("--resume", action="store_true",
                   help="continue the study in OUT (its settings must be the ones it started with)")
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


# A teacher's forward pass per distillation step, relative to one ResNet18 training step (forward + backward) at the
# same size: a forward is about a third of a training step, and ResNet50 needs 2.3x ResNet18's operations.
FORWARD_COST = {"resnet18": 0.33, "resnet50": 0.76}
FORMER_STEPS = {"dermoscopy check": "gate"}  # progress.json's step names formerly: a resumed study still skips them


def teacher_cost(paths: list[str], tta: bool) -> float:
    """What a teacher adds to each distillation step, in ResNet18 training steps (8 views with TTA)."""
    archs = [load_checkpoint(p)["arch"] for p in paths]
    return round(sum(FORWARD_COST.get(a, 1.0) for a in archs) * (8 if tta else 1), 2)


def choose_teacher(data: D.DataConfig, candidates: dict[str, list[str]], device: str = "auto",
                   tta: bool = False, max_cost: float | None = None) -> tuple[str, str, dict]:
    """Pick the teacher with the best validation macro-F1 among trained checkpoints and their ensemble (and, with
    tta, each of them averaged over its 8 dihedral views), among those whose cost per distillation step is at most
    max_cost (every candidate is scored and recorded either way). Returns (name, spec, scores)."""
    dev = resolve_device(device)
    val = D.load_split(data).part("val")
    y = np.array([r.label for r in val])
    specs = {name: (teacher_spec(paths), teacher_cost(paths, False)) for name, paths in candidates.items()}
    if tta:
        specs.update({f"{name} + TTA": (teacher_spec(paths, tta=True), teacher_cost(paths, True))
                      for name, paths in candidates.items()})
    scores = {}
    for name, (spec, cost) in specs.items():
        model, ckpt = models_from_spec(spec)
        cfg = checkpoint_preprocessing(ckpt)
        x = D.build_cache(val, "eval", cfg, data.cache, "decode val")
        logits = predict_logits(model.to(dev), x, cfg.mean, cfg.std)
        m = classification_metrics(y, logits.argmax(1).numpy(), D.CLASS_NAMES)
        scores[name] = {"val_macro_f1": m["macro_f1"], "val_balanced_accuracy": m["balanced_accuracy"],
                        "cost_per_step": cost, "eligible": max_cost is None or cost <= max_cost}
        print(f"teacher candidate {name:24} val macro-F1 {m['macro_f1']:.3f} bal-acc {m['balanced_accuracy']:.3f} "
              f"cost {cost:.2f} ResNet18 steps", flush=True)
    best = max((k for k in scores if scores[k]["eligible"]), key=lambda k: scores[k]["val_macro_f1"])
    return best, specs[best][0], scores


def _check_resume(study: StudyConfig, out: Path, resume: bool) -> None:
    """OUT/study.json: the settings a study started with and the commit of its code. A second start in the same
    folder needs --resume, and a resume with other settings is refused (its runs would mix two recipes)."""
    record = out / "study.json"
    settings = {k: v for k, v in dataclasses.asdict(study).items() if k not in ("command", "time_budget")}
    if record.exists():
        if not resume:
            raise StudyError(f"{out} holds a study already: pass --resume to continue it, or choose another --out")
        before = json.loads(record.read_text())
        changed = sorted(k for k in set(settings) | set(before["settings"])
                         if settings.get(k) != before["settings"].get(k))
        if changed:
            raise StudyError(f"{out} was started with other settings ({', '.join(changed)}): resume it with the "
                             f"command in {record}, or choose another --out")
        return
    record.write_text(json.dumps({"settings": settings, "command": study.command, "commit": git_sha(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))


def _done(out: Path, step: str, fn) -> None:
    """Run a step after training once: OUT/progress.json records it, a resumed study skips it."""
    progress = out / "progress.json"
    done = json.loads(progress.read_text()) if progress.exists() else {}
    if step in done or FORMER_STEPS.get(step) in done:
        print(f"[skip] {step} is done", flush=True)
        return
    started = time.time()
    fn()
    done[step] = {"seconds": round(time.time() - started, 1), "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    progress.write_text(json.dumps(done, indent=2))


def _epochs(study: StudyConfig, epochs: int, data: D.DataConfig) -> int:
    """With equal_compute, epoch counts are for the first searched size; other sizes get the same compute."""
    return equal_compute_epochs(epochs, data.img_size, study.recipe_sizes[0]) if study.equal_compute else epochs


def _recipe(study: StudyConfig, out: Path) -> tuple[D.DataConfig, Recipe]:
    """The data settings and recipe every later run shares: the study's own, or the recipe search's winners."""
    if not study.recipe_search:
        return study.data, study.recipe
    base = TrainConfig(out="", data=study.data, arch="resnet18", batch_size=study.batch_size, seed=study.seed,
                       device=study.device, precision=study.precision, recipe=study.recipe)
    chosen = search_recipe(study.data, out / "recipe", base, study.recipe_epochs,
                           stages(study.recipe_variants, study.recipe_sizes))
    data = dataclasses.replace(study.data, img_size=chosen.pop("img_size"),
                               colour_constancy=chosen.pop("colour_constancy"))
    return data, dataclasses.replace(study.recipe, **chosen)


def _teacher(study: StudyConfig, out: Path, data: D.DataConfig, runs: dict) -> dict:
    """The teacher chosen on validation, kept in OUT/teacher.json (a resumed study reads it back)."""
    chosen = out / "teacher.json"
    if chosen.exists():
        return json.loads(chosen.read_text())
    trained = [key for key in ("resnet18", "resnet50") if key in runs]
    candidates = {key: [str(runs[key] / "best.pt")] for key in trained}
    if len(trained) == 2:
        candidates["resnet18+resnet50"] = candidates["resnet18"] + candidates["resnet50"]
    name, spec, scores = choose_teacher(data, candidates, study.device, study.teacher_tta, study.max_teacher_cost)
    record = {"chosen": name, "spec": spec, "checkpoints": spec.removeprefix(TTA_PREFIX).split("+"),
              "tta": spec.startswith(TTA_PREFIX), "candidates": scores}
    chosen.write_text(json.dumps(record, indent=2))
    return record


def study_runs(study: StudyConfig, out: Path) -> dict[str, Path]:
    """Each network's run folder; a study with --epochs-resnet50 0 trains no ResNet50 (a session-sized CPU study)."""
    runs = {"resnet18": out / "resnet18", "resnet50": out / "resnet50", "kd": out / "resnet18_kd"}
    return {k: v for k, v in runs.items() if k != "resnet50" or study.epochs_resnet50}


def train_networks(study: StudyConfig, out: Path) -> tuple[D.DataConfig, dict, dict]:
    """Recipe, baselines, teacher, grid, student: every network of the study (each resumable)."""
    steps = {"resnet18", "kd"} | ({"resnet50"} if study.epochs_resnet50 else set()) | (
        {"grid"} if study.grid else set()) | ({"recipe"} if study.recipe_search else set())
    budget = Budget(study.time_budget, steps)
    data, recipe = _recipe(study, out)
    common = dict(data=data, batch_size=study.batch_size, seed=study.seed, device=study.device,
                  precision=study.precision, recipe=recipe)
    runs = study_runs(study, out)
    for key in ("resnet18", "resnet50"):  # the baselines without a teacher (--epochs-resnet50 0: no ResNet50)
        if key in runs:
            run_or_resume(TrainConfig(out=str(runs[key]), arch=key, time_budget=budget(key), **common,
                                      epochs=_epochs(study, getattr(study, f"epochs_{key}"), data)))
    teacher = _teacher(study, out, data, runs)
    kd = dict(common, teacher=teacher["checkpoints"], teacher_tta=teacher["tta"], arch="resnet18",
              alpha=study.alpha, temperature=study.temperature)
    if study.grid:
        cells = len(study.grid_alphas) * len(study.grid_temps)
        base = TrainConfig(out="", **{**kd, "epochs": _epochs(study, study.grid_epochs, data),
                                      "max_train_images": study.grid_max_train_images,
                                      "time_budget": budget("grid") / cells if study.time_budget else None})
        chosen = grid_search(base, out / "grid", study.grid_alphas, study.grid_temps)
        kd.update(alpha=chosen["alpha"], temperature=chosen["temperature"])
    teacher.update(alpha=kd["alpha"], temperature=kd["temperature"])
    (out / "teacher.json").write_text(json.dumps(teacher, indent=2))
    # Under a time budget the student gets as many epochs as the ResNet18 trained without a teacher, at most:
    # "distillation helps" is then a comparison at equal epochs, not at equal seconds.
    epochs_kd = _epochs(study, study.epochs_kd, data)
    epochs_kd = min(epochs_kd, epochs_run(runs["resnet18"])) if study.time_budget else epochs_kd
    run_or_resume(TrainConfig(out=str(runs["kd"]), epochs=epochs_kd, time_budget=budget("kd"), **kd))
    return data, teacher, runs


def run_study(study: StudyConfig, after_training=None, resume: bool = True) -> ReleaseMeta:
    """Every step in order; after_training() is called once the last network is trained (the accelerator run
    sends the student back from there, before the steps a CPU could redo)."""
    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StudyError("the whole study runs in one process: under torchrun, run `python -m training train` "
                         "steps (the study's evaluation and export steps are not sharded)")
    _check_resume(study, out, resume)
    study.data.use_threads()
    data, teacher, runs = train_networks(study, out)
    if after_training:
        try:
            after_training()
        except Exception as err:  # noqa: BLE001 - sending a copy early must not stop the study that trained
            print(f"could not send the student back early: {err}", flush=True)
    return make_release(study, out, data, teacher, runs)


def make_release(study: StudyConfig, out: Path, data: D.DataConfig, teacher: dict, runs: dict) -> ReleaseMeta:
    """Test table, export, calibration, the dermoscopy check, the served report and the model card (each once)."""
    report_dir, student = out / "report", str(runs["kd"] / "best.pt")
    release = Path(study.release_dir) if study.release_dir else out / "release"
    compared = {f"{key} (scratch)": str(runs[key] / "best.pt") for key in ("resnet18", "resnet50") if key in runs}
    compared.update({f"teacher: {teacher['chosen']}": teacher["spec"], "resnet18 distilled": student})
    _done(out, "evaluate", lambda: evaluate(data, compared, report_dir, command=study.command, device=study.device))
    _done(out, "export", lambda: export(student, release, study.name, study.version,
                                        str(report_dir / "results.json"), "resnet18 distilled",
                                        command=study.command))
    _done(out, "calibrate", lambda: calibrate(student, release, data, study.device))
    _done(out, "dermoscopy check", lambda: fit_dermoscopy_check(release, data, device=study.device))
    _done(out, "served test", lambda: _served(release, data))
    served_file = release / SERVED_TEST / "results.json"
    served = json.loads(served_file.read_text()) if served_file.exists() else None
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


def _served(release: Path, data: D.DataConfig) -> dict | None:
    """The release as served, on the test split with its metadata: the subgroup tables of the report and card."""
    try:
        return evaluate_release(release, str(D.resolve_data_dir(data.data)), release / SERVED_TEST, "test",
                                data.split_seed, data.limit_per_class)
    except D.DataError as err:  # e.g. a smoke run whose test split lacks a class: the release itself is fine
        print(f"no served test report: {err}")
    except ModuleNotFoundError as err:  # a GPU box without TorchServe's Python package: keep the trained release
        if err.name != "ts":
            raise
        print(f"no served test report: TorchServe's Python package is not installed here. Where it is: "
              f"python -m training evaluate-release --release {release} --data HAM10000_DIR --split test "
              f"--out {release / SERVED_TEST}", flush=True)
    return None


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
    return run_study(study, resume=args.resume)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
