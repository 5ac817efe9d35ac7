"""The student's recipe, chosen on validation at a proxy budget: every combination of RECIPE_SPACE trained as a
short ResNet18 run without a teacher, the winner the best balanced accuracy among the runs whose accuracy beats
always answering the commonest class (full inverse-frequency weights can buy balanced accuracy with a collapse of
`nv` recall, and with it of accuracy). recipe.csv and recipe.json record every run and the rule.
"""
from __future__ import annotations

import csv
import itertools
import json
from collections import Counter
from pathlib import Path

from training import data as D
from training.train import TrainConfig, train

RECIPE_SPACE = {"class_weighting": ("inverse", "sqrt"), "mix": ("none", "mixup", "cutmix")}
RULE = "highest validation balanced accuracy among runs whose validation accuracy beats always answering the " \
       "training split's commonest class (all runs if none does)"


def variants(space: dict = RECIPE_SPACE, limit: int | None = None) -> list[dict]:
    combos = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    return combos[:limit] if limit else combos


def search_recipe(data: D.DataConfig, out: Path, base: TrainConfig, candidates: list[dict],
                  time_budget: float | None = None) -> dict:
    """One run per candidate (each skipped when already complete), `base` giving everything else; returns the
    chosen candidate and writes OUT/recipe.csv + OUT/recipe.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = D.load_split(data)
    commonest = Counter(r.label for r in split.part("train")).most_common(1)[0][0]
    val = [r.label for r in split.part("val")]
    floor = sum(y == commonest for y in val) / len(val)
    rows = []
    for candidate in candidates:
        name = "_".join(f"{v}" for v in candidate.values())
        run = TrainConfig(**{**vars(base), "out": str(out / name), "time_budget": time_budget and time_budget /
                             len(candidates), **candidate})
        done = Path(run.out) / "best.json"
        best = json.loads(done.read_text()) if done.exists() else train(run)
        rows.append({**candidate, "val_balanced_accuracy": best["val_balanced_accuracy"],
                     "val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"],
                     "best_epoch": best["epoch"]})
    eligible = [r for r in rows if r["val_accuracy"] > floor] or rows
    winner = max(eligible, key=lambda r: r["val_balanced_accuracy"])
    chosen = {k: winner[k] for k in candidates[0]}
    with open(out / "recipe.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "recipe.json").write_text(json.dumps({"rule": RULE, "accuracy_floor": floor, "runs": rows,
                                                 "chosen": chosen}, indent=2))
    print("recipe: " + ", ".join(f"{k} {v}" for k, v in chosen.items())
          + f" (val balanced accuracy {winner['val_balanced_accuracy']:.3f}, accuracy {winner['val_accuracy']:.3f}"
          + f" against {floor:.3f} for always the commonest class)", flush=True)
    return chosen
