"""The recipe, chosen on validation at a proxy budget, one question at a time (coordinate search): each stage trains
a short ResNet18 run without a teacher for every value of one setting, the others at their current choice, and
keeps the winner for the stages after it. Runs are named by their whole setting, so a run two stages share is
trained once, and every run resumes (training.network.train.run_or_resume).

Stages: input size (at equal compute: epochs x pixels, so 224 px gets (128/224)^2 of 128 px's epochs), colour
constancy, the weights' moving average, then class weighting x mix. The score of a run is its best checkpoint's
validation balanced accuracy averaged over the plain split and the split under two shift families that stand in
for other clinics' light and cameras (colour temperature, brightness); a run must beat always answering the
commonest class on plain validation accuracy (full inverse-frequency weights can buy balanced accuracy with a
collapse of `nv`). recipe.csv and recipe.json record every run, the stages and the rule.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skinmodel.preprocessing import eval_uint8
from training.common import data as D
from training.common.checkpoint import checkpoint_preprocessing, model_from_checkpoint
from training.common.device import resolve_device
from training.common.metrics import classification_metrics, predict_logits
from training.dermoscopy.shifts import FAMILIES
from training.network.train import TrainConfig, run_or_resume

SCORE_SHIFTS = ("colour temperature", "brightness")
SIZES = (128, 160, 224)
STAGES = {
    "img_size": [{"img_size": s} for s in SIZES],
    "colour_constancy": [{"colour_constancy": c} for c in ("none", "shades_of_gray_p6")],
    "ema": [{"ema": e} for e in (0.0, 0.999)],
    "class_weighting x mix": [{"class_weighting": w, "mix": m}
                              for w, m in itertools.product(("inverse", "sqrt"), ("none", "mixup", "cutmix"))],
}
RULE = ("coordinate search over the stages in order; within a stage, the highest mean validation balanced accuracy "
        f"over the plain split and the split under {' and '.join(SCORE_SHIFTS)}, among runs whose plain validation "
        "accuracy beats always answering the training split's commonest class (all runs if none does)")
DATA_KEYS = ("img_size", "colour_constancy")
SHORT = {"img_size": "px", "colour_constancy": "cc", "class_weighting": "cw", "ema": "ema", "mix": "mix"}


def equal_compute_epochs(epochs: int, img_size: int, reference: int) -> int:
    """Epochs at img_size that cost what `epochs` cost at the reference size (a step's cost grows with pixels)."""
    return max(1, round(epochs * (reference / img_size) ** 2))


def stages(limit: int | None = None, sizes=SIZES) -> dict:
    """The stages, the input sizes given; with limit, each cut to its first `limit` values (smoke runs)."""
    chosen = {**STAGES, "img_size": [{"img_size": s} for s in sizes]}
    return {name: values[:limit] if limit else values for name, values in chosen.items()}


def candidate_config(base: TrainConfig, setting: dict, out: Path, proxy_epochs: int, reference: int) -> TrainConfig:
    data = dataclasses.replace(base.data, **{k: setting[k] for k in DATA_KEYS if k in setting})
    name = "_".join(f"{SHORT.get(k, k)}-{setting[k]}" for k in sorted(setting))  # px-128_cc-none_ema-0.999_...
    recipe = dataclasses.replace(base.recipe, **{k: v for k, v in setting.items() if k not in DATA_KEYS})
    return dataclasses.replace(base, data=data, recipe=recipe, out=str(out / name), resume=True, time_budget=None,
                               epochs=equal_compute_epochs(proxy_epochs, data.img_size, reference))


def _shifted_val(records: list[D.Record], cfg, family: str, seed: int) -> torch.Tensor:
    """The validation images under one draw of a shift family each, preprocessed as served."""
    def one(i):
        with Image.open(records[i].path) as img:
            return eval_uint8(FAMILIES[family](img.convert("RGB"), np.random.default_rng(seed + i)), cfg)
    return torch.stack(list(D.thread_map(one, range(len(records)))))


def score_run(run: TrainConfig, device: str = "auto") -> dict:
    """A finished run's best checkpoint on validation: plain and under SCORE_SHIFTS (balanced accuracy each)."""
    best_file = Path(run.out) / "score.json"
    if best_file.exists():
        return json.loads(best_file.read_text())
    model, ckpt = model_from_checkpoint(Path(run.out) / "best.pt")
    model = model.to(resolve_device(device))
    cfg = checkpoint_preprocessing(ckpt)
    val = D.load_split(run.data).part("val")
    y = np.array([r.label for r in val])
    sets = {"plain": D.build_cache(val, "eval", cfg, run.data.cache, "decode val")}
    sets.update({fam: _shifted_val(val, cfg, fam, 40_000_000 + 100_000 * i) for i, fam in enumerate(SCORE_SHIFTS)})
    scores = {}
    for name, x in sets.items():
        m = classification_metrics(y, predict_logits(model, x, cfg.mean, cfg.std).argmax(1).numpy(), D.CLASS_NAMES)
        scores[name] = m["balanced_accuracy"]
        if name == "plain":
            scores["accuracy"] = m["accuracy"]
    scores["score"] = float(np.mean([scores[k] for k in ("plain", *SCORE_SHIFTS)]))
    best_file.write_text(json.dumps(scores, indent=2))
    return scores


def search_recipe(data: D.DataConfig, out: Path, base: TrainConfig, proxy_epochs: int,
                  search: dict | None = None) -> dict:
    """Every stage in order (each run resumed or skipped when complete); returns the chosen setting (data keys
    included) and writes OUT/recipe.csv + OUT/recipe.json. proxy_epochs count at the first input size searched."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = D.load_split(data)
    commonest = Counter(r.label for r in split.part("train")).most_common(1)[0][0]
    val = [r.label for r in split.part("val")]
    floor = sum(y == commonest for y in val) / len(val)
    chosen = {"img_size": data.img_size, "colour_constancy": data.colour_constancy,
              **{k: getattr(base.recipe, k) for k in ("ema", "class_weighting", "mix")}}
    rows, search = [], search or STAGES
    reference = search["img_size"][0]["img_size"] if search.get("img_size") else data.img_size
    for stage, values in search.items():
        stage_rows = []
        for value in values:
            run = candidate_config(base, {**chosen, **value}, out, proxy_epochs, reference)
            best = run_or_resume(run)
            row = {"stage": stage, **chosen, **value, "epochs": run.epochs, **score_run(run, base.device),
                   "val_macro_f1": best["val_macro_f1"], "best_epoch": best["epoch"]}
            stage_rows.append(row)
        eligible = [r for r in stage_rows if r["accuracy"] > floor] or stage_rows
        winner = max(eligible, key=lambda r: r["score"])
        chosen.update({k: winner[k] for k in values[0]})
        rows.extend(stage_rows)
        print(f"recipe stage {stage}: " + ", ".join(f"{k} {winner[k]}" for k in values[0])
              + f" (score {winner['score']:.3f})", flush=True)
    with open(out / "recipe.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "recipe.json").write_text(json.dumps({"rule": RULE, "accuracy_floor": floor, "proxy_epochs_at":
                                                 {"epochs": proxy_epochs, "img_size": reference},
                                                 "runs": rows, "chosen": chosen}, indent=2))
    return chosen
