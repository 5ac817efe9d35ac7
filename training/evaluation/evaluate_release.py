"""A release on a labelled set, scored exactly as it is served: the serving handler in this process (same
decoding, preprocessing, temperature, verdicts), then the study's metrics twice (a refusal counted as a miss,
and over the answered images only), per-class recall with Wilson intervals, refusal rates, ECE with a
reliability plot, a confusion matrix, and subgroup tables where the set carries age, sex or body site.

    python -m training evaluate-release --release release --data our_lesions/ --out reports/ours
    python -m training evaluate-release --release release --data ISIC2018_Task3_Training_GroundTruth.csv --out reports/isic
    python -m training evaluate-release --release release --data ../shared/data/ham10000 --split test --out reports/test
"""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.common import data as D
from training.release.calibrate import expected_calibration_error, plot_reliability
from training.evaluation.labelled import Labelled, load_labelled
from training.common.metrics import classification_metrics, wilson
from training.common.plots import plot_confusion
from training.evaluation.subgroups import render_subgroups, subgroup_rows

REFUSED = -1  # the predicted class of a refused image (not_dermoscopy or an error): a miss


def serve_in_process(release: Path, items: list[Labelled], batch: int = 32) -> tuple[list[dict], object]:
    """Each image's answer from the serving handler, as /predictions gives it; and the release's meta."""
    import logging

    logging.getLogger("ts").setLevel(logging.ERROR)  # TorchServe's import-time notes
    from handler.skin_handler import SkinLesionHandler

    h = SkinLesionHandler.in_process(release)  # an evaluation is not a prediction: nothing is audited
    answers = []
    for i in tqdm(range(0, len(items), batch), desc="scoring", unit="batch"):
        answers += h.answer([it.path.read_bytes() for it in items[i:i + batch]])
    return answers, h.meta


def _metrics_with_refusals(y: np.ndarray, pred: np.ndarray, names) -> dict:
    """The study's metrics where a refused image counts as a wrong answer for its class."""
    from sklearn.metrics import f1_score, recall_score

    labels = list(range(len(names)))
    recall = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    return {"accuracy": float((pred == y).mean()), "balanced_accuracy": float(recall.mean()),
            "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
            "per_class_recall": {c: float(v) for c, v in zip(names, recall)}}


def evaluate_release(release: Path, source: str, out: Path, split: str | None = None, split_seed: int = 0,
                     limit_per_class: int | None = None) -> dict:
    release, out = Path(release), Path(out)
    items = load_labelled(source, split, split_seed, limit_per_class)
    answers, meta = serve_in_process(release, items)
    names = list(meta.class_names)
    if names != list(D.CLASS_NAMES):
        raise D.DataError(f"the release's classes {names} are not HAM10000's {list(D.CLASS_NAMES)}")
    y = np.array([it.label for it in items])
    probs = np.array([[{p["code"]: p["probability"] for p in a.get("predictions", [])}.get(c, np.nan) for c in names]
                      for a in answers])
    verdicts = np.array([a.get("verdict") or f"error: {a.get('error')}" for a in answers])
    answered = np.array([v in ("ok", "uncertain") for v in verdicts])
    pred = np.where(answered, np.nan_to_num(probs).argmax(1), REFUSED)

    calibrated = torch.tensor(probs[answered], dtype=torch.float64)
    labels = torch.tensor(y[answered])
    uncalibrated = torch.softmax(meta.temperature * calibrated.clamp_min(1e-12).log(), 1)  # the logits up to a constant
    ece_before, bins_before = expected_calibration_error(uncalibrated, labels)
    ece_after, bins_after = expected_calibration_error(calibrated, labels)
    out.mkdir(parents=True, exist_ok=True)
    plot_reliability(bins_before, bins_after, meta.temperature, out / "reliability.png")

    refusals_as_misses = _metrics_with_refusals(y, pred, names)
    over_answered = classification_metrics(y[answered], pred[answered], names) if answered.any() else None
    matrix = over_answered["confusion_matrix"] if over_answered else [[0] * len(names)] * len(names)
    plot_confusion(matrix, names, f"{meta.name} {meta.version} on {Path(source).name} (answered images)",
                   out / "confusion.png")
    per_class = {}
    for k, c in enumerate(names):
        mask = y == k
        hits, n = int(((pred == k) & mask).sum()), int(mask.sum())
        lo, hi = wilson(hits, n)
        per_class[c] = {"images": n, "recall": hits / n, "recall_ci95": [lo, hi],
                        "not_dermoscopy": float((verdicts[mask] == "not_dermoscopy").mean()),
                        "uncertain": float((verdicts[mask] == "uncertain").mean())}
    results = {
        # Folder names, not paths: a report that travels with a release names no folder of the machine it ran on.
        "model": {"name": meta.name, "version": meta.version, "release": Path(release).name},
        "data": Path(source).name, "split": split, "images": len(items), "date": datetime.now(timezone.utc).isoformat(),
        "verdicts": {v: int((verdicts == v).sum()) for v in sorted(set(verdicts))},
        "refusals_as_misses": refusals_as_misses, "answered_only": over_answered, "per_class": per_class,
        "ece_before_temperature": ece_before if answered.any() else None,
        "ece": ece_after if answered.any() else None,
        "subgroups": subgroup_rows(items, y, pred, verdicts, names.index("mel")),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(render_report(results))
    return results


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def render_report(r: dict) -> str:
    m, a = r["refusals_as_misses"], r["answered_only"] or {}
    rows = "\n".join(f"| {c} | {v['images']} | {v['recall']:.2f} | {v['recall_ci95'][0]:.2f}-{v['recall_ci95'][1]:.2f} "
                     f"| {v['uncertain']:.1%} | {v['not_dermoscopy']:.1%} |" for c, v in r["per_class"].items())
    verdicts = ", ".join(f"{k} {n}" for k, n in r["verdicts"].items())
    return f"""# {r['model']['name']} {r['model']['version']} on {r['data']}{f" (split {r['split']})" if r['split'] else ''}

{r['images']} images, scored in-process by the serving handler (same preprocessing, temperature and verdicts as
/predictions); generated {r['date'][:19]}Z. Verdicts: {verdicts}.

| counting | accuracy | balanced accuracy | macro-F1 |
|---|---|---|---|
| refusals as misses | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | {m['macro_f1']:.3f} |
| answered images only | {a.get('accuracy', float('nan')):.3f} | {a.get('balanced_accuracy', float('nan')):.3f} | {a.get('macro_f1', float('nan')):.3f} |

| class | images | recall (refusal = miss) | 95 % CI (Wilson) | uncertain | not_dermoscopy |
|---|---|---|---|---|---|
{rows}

Calibration over the answered images: ECE {_num(r['ece'])} (before the release's temperature:
{_num(r['ece_before_temperature'])}); `reliability.png`. Confusion matrix of the answered images: `confusion.png`.

{render_subgroups(r['subgroups'])}
"""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a release exactly as it is served (the handler's decoding, "
                                            "verdicts and refusals) on any labelled set.", add_help=add_help)
    p.add_argument("--release", required=True, help="a release folder (meta.json + weights)")
    p.add_argument("--split", choices=D.SPLITS, help="with the HAM10000 folder: that part of the study's "
                                                    "lesion-grouped split (with its age/sex/site metadata)")
    D.add_data_args(p, sizes=False, compute=False)
    p.add_argument("--out", required=True, help="report folder: report.md, results.json, confusion and reliability")
    return p


def main(args: argparse.Namespace) -> dict:
    if not args.data:
        raise D.DataError("--release needs --data: a folder of <class>/ subfolders, a CSV (image,label or ISIC one-hot), "
                          "or the HAM10000 folder with --split test")
    results = evaluate_release(Path(args.release), args.data, Path(args.out), args.split, args.split_seed,
                               args.limit_per_class)
    print(f"wrote {args.out}/report.md: balanced accuracy {results['refusals_as_misses']['balanced_accuracy']:.3f} "
          f"(refusals as misses) over {results['images']} images")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
