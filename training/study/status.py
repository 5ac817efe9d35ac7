"""Where a study stands: every run's epochs done of planned, its seconds per epoch, the steps after training, and
an estimate of the time left. Reads only what the study writes (study.json, each run's args.json and
history.csv, progress.json), so it is safe while the study runs.

    python -m training status --out runs/study

Runs not started yet are estimated from the measured epochs of the study's own ResNet18 runs, scaled by the
input's pixels and the network's cost (COST); the estimate says so.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from training.common.checkpoint import StudyError
from training.study.pipeline import FORMER_STEPS, FORWARD_COST
from training.study.recipe_search import STAGES, equal_compute_epochs

# Seconds of an epoch relative to a plain ResNet18 epoch at the same size and batch (ResNet50: 2.3x the
# operations); a distilled ResNet18 also pays for its teacher's forward passes (pipeline.FORWARD_COST).
COST = {"resnet18": 1.0, "resnet50": 2.3}
AFTER_TRAINING = ("evaluate", "export", "calibrate", "dermoscopy check", "served test")
TRAIN_IMAGES = 6008  # HAM10000's training split (seed 0): what a grid cell's --grid-max-train-images is a share of


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Show where a study stands (runs, epochs, steps after training, ETA).",
                                add_help=add_help)
    p.add_argument("--out", default="runs/study", help="the study folder (python -m training all --out)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    return p


def run_state(folder: Path) -> dict:
    """One run folder: planned epochs, epochs done, the median seconds of its epochs, finished or not."""
    args = json.loads((folder / "args.json").read_text())
    rows = []
    if (folder / "history.csv").exists():
        with open(folder / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    budget = folder / "budget.json"
    planned = json.loads(budget.read_text())["planned_epochs"] if budget.exists() else args["epochs"]
    seconds = sorted(float(r["seconds"]) for r in rows)
    return {"run": str(folder), "arch": args["arch"], "img_size": args["img_size"], "teacher": bool(args["teacher"]),
            "tta": bool(args.get("teacher_tta")), "epochs_done": len(rows), "epochs": planned,
            "epoch_s": seconds[len(seconds) // 2] if seconds else None, "done": (folder / "best.json").exists(),
            "modified": (folder / "history.csv").stat().st_mtime if rows else None}


def _reference_epoch_s(runs: list[dict]) -> float | None:
    """Seconds of a plain ResNet18 epoch at 128 px, from the study's own measured runs (pixels scaled)."""
    plain = [r for r in runs if r["arch"] == "resnet18" and not r["teacher"] and r["epoch_s"]]
    if not plain:
        return None
    return sorted(r["epoch_s"] * (128 / r["img_size"]) ** 2 for r in plain)[len(plain) // 2]


def expected(study: dict, out: Path) -> tuple[list[dict], int]:
    """The long runs a study's settings promise, and their input size (the recipe search's, once it has chosen)."""
    s = study["settings"]
    recipe = out / "recipe" / "recipe.json"
    size = json.loads(recipe.read_text())["chosen"]["img_size"] if recipe.exists() else s["data"]["img_size"]

    def epochs(n: int) -> int:
        return equal_compute_epochs(n, size, s["recipe_sizes"][0]) if s.get("equal_compute") else n

    share = min(1.0, (s.get("grid_max_train_images") or TRAIN_IMAGES) / TRAIN_IMAGES)  # cells on a subset
    planned = []
    if s.get("recipe_search"):  # every stage shares one run with the stage before: 3 + 1 + 1 + 5 runs
        runs = sum(len(v) for v in STAGES.values()) - (len(STAGES) - 1)
        planned += [{"name": f"recipe run {i + 1}", "folder": "recipe", "arch": "resnet18", "teacher": False,
                     "epochs": s["recipe_epochs"], "size": s["recipe_sizes"][0]} for i in range(runs)]
    planned += [{"name": arch, "arch": arch, "teacher": False, "epochs": epochs(s[f"epochs_{arch}"])}
                for arch in ("resnet18", "resnet50") if s[f"epochs_{arch}"]]  # --epochs-resnet50 0: none
    if s.get("grid"):
        planned += [{"name": f"grid cell {i + 1}", "folder": "grid", "arch": "resnet18", "teacher": True,
                     "epochs": epochs(s["grid_epochs"]) * share}
                    for i in range(len(s["grid_alphas"]) * len(s["grid_temps"]))]
    planned.append({"name": "resnet18_kd", "arch": "resnet18", "teacher": True, "epochs": epochs(s["epochs_kd"])})
    return planned, size


def _teacher_factor(out: Path) -> float:
    """The chosen teacher's cost per step, or (not chosen yet) a ResNet50's."""
    chosen = out / "teacher.json"
    if chosen.exists():
        t = json.loads(chosen.read_text())
        return t["candidates"][t["chosen"]].get("cost_per_step", FORWARD_COST["resnet50"])
    return FORWARD_COST["resnet50"]


def status(out: Path) -> dict:
    out = Path(out)
    if not (out / "study.json").exists():
        raise StudyError(f"{out} holds no study (no study.json): start one with python -m training all --out {out}")
    study = json.loads((out / "study.json").read_text())
    runs = [run_state(p.parent) for p in sorted(out.rglob("args.json"))]
    ref = _reference_epoch_s(runs)
    left = 0.0
    for r in runs:
        if not r["done"]:
            per = r["epoch_s"] or (ref and ref * (r["img_size"] / 128) ** 2 * COST[r["arch"]])
            left += (per or 0) * (r["epochs"] - r["epochs_done"])
    planned, size = expected(study, out)
    started = {Path(r["run"]).name for r in runs}
    in_folder = {folder: sum(1 for r in runs if Path(r["run"]).parent.name == folder) for folder in ("recipe", "grid")}
    waiting = []
    for p in planned:
        if p.get("folder"):  # the n-th recipe run or grid cell: started once its folder holds n runs
            if int(p["name"].rsplit(" ", 1)[1]) <= in_folder[p["folder"]]:
                continue
        elif p["name"] in started:
            continue
        waiting.append(p["name"])
        factor = COST[p["arch"]] + (_teacher_factor(out) if p["teacher"] else 0)
        left += (ref or 0) * (p.get("size", size) / 128) ** 2 * factor * p["epochs"]
    progress = json.loads((out / "progress.json").read_text()) if (out / "progress.json").exists() else {}
    heartbeat = max((r["modified"] or 0 for r in runs), default=0)
    return {"study": str(out), "commit": study.get("commit"), "started": study.get("started"), "runs": runs,
            "not_started": waiting,
            "after_training": {s: s in progress or FORMER_STEPS.get(s) in progress for s in AFTER_TRAINING},
            "training_hours_left_estimate": round(left / 3600, 2) if ref else None,
            "last_epoch_ended": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(heartbeat)) if heartbeat else None,
            "running": _running(out)}


def _running(out: Path) -> bool | None:
    """Whether the study's process (OUT/study.pid, written by training/background.sh) is alive."""
    pid_file = out / "study.pid"
    if not pid_file.exists():
        return None
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
        return True
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True


def render(st: dict) -> str:
    lines = [f"study {st['study']} (commit {str(st['commit'])[:12]}, started {st['started']}; "
             f"process {'running' if st['running'] else 'not running' if st['running'] is False else 'unknown'})"]
    for r in st["runs"]:
        state = "done" if r["done"] else f"{r['epochs_done']}/{r['epochs']} epochs"
        per = f"{r['epoch_s']:.0f} s/epoch" if r["epoch_s"] else "-"
        lines.append(f"  {Path(r['run']).relative_to(st['study'])!s:44} {r['arch']:9} {r['img_size']:>4} px  "
                     f"{state:18} {per}")
    groups: dict[str, int] = {}
    for name in st["not_started"]:  # "grid cell 7" -> "grid cell", counted
        head, _, tail = name.rpartition(" ")
        key = head if tail.isdigit() else name
        groups[key] = groups.get(key, 0) + 1
    for name, count in groups.items():
        lines.append(f"  {name + (f' x {count}' if count > 1 else ''):44} not started")
    lines.append("  after training: " + ", ".join(f"{k} {'done' if v else '-'}" for k, v in st["after_training"].items()))
    eta = st["training_hours_left_estimate"]
    lines.append(f"training left: about {eta} h on this machine (an estimate from the study's measured epochs)"
                 if eta is not None else "training left: unknown until a ResNet18 epoch has been measured")
    if st["last_epoch_ended"]:
        lines.append(f"last epoch ended {st['last_epoch_ended']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    st = status(Path(args.out))
    print(json.dumps(st, indent=2) if args.json else render(st))
    return st


if __name__ == "__main__":
    main(get_args_parser().parse_args())
