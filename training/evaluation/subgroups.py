"""Does the model do worse for some patients? Balanced accuracy, melanoma recall and refusal rate by age band,
sex and body site, with counts and 95 % Wilson intervals; groups under MIN_READABLE images are marked too small
to read. Skin type is not recorded in HAM10000 (nor in most dermoscopy sets): no table can show it.
"""
from __future__ import annotations

import math

import numpy as np

from training.common.metrics import wilson

MIN_READABLE = 30
# Column names as HAM10000 and ISIC's metadata spell them (lower-cased), in the order the tables are shown.
ATTRIBUTES = {"age band": ("age", "age_approx"), "sex": ("sex",),
              "body site": ("localization", "anatom_site_general", "anatom_site_general_challenge", "site")}


def age_band(value: str) -> str:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return "unknown"
    if not math.isfinite(age) or age < 0:
        return "unknown"
    if age < 30:
        return "under 30"
    return "70 and over" if age >= 70 else f"{int(age // 10) * 10}-{int(age // 10) * 10 + 9}"


BOOTSTRAP = 1000  # resamples for the balanced-accuracy interval


def _balanced(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present (a refusal, -1, is a miss)."""
    return float(np.mean([(pred[y == k] == k).mean() for k in np.unique(y)]))


def _bootstrap_ci(y: np.ndarray, pred: np.ndarray, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap interval of the balanced accuracy (images resampled with replacement)."""
    rng = np.random.default_rng(seed)
    draws = [_balanced(y[i], pred[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(BOOTSTRAP))]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def _order(group: str):
    """Age bands by age, other groups by name; 'unknown' last."""
    if group == "unknown":
        return (2, 0, group)
    if group == "under 30":
        return (0, 0, group)
    head = group.split("-")[0].split(" ")[0]
    return (0, int(head), group) if head.isdigit() else (1, 0, group)


def subgroup_rows(items, y: np.ndarray, pred: np.ndarray, verdicts: np.ndarray, mel: int) -> dict:
    """{attribute: [{group, images, classes_present, balanced_accuracy (+ bootstrap _ci95), mel_images, mel_recall
    (+ Wilson _ci95), refused (+ Wilson _ci95), readable}]} for each attribute the set carries; a refusal counts as
    a miss."""
    out = {}
    for attribute, columns in ATTRIBUTES.items():
        column = next((c for c in columns if items and all(c in it.extra for it in items)), None)
        if column is None:
            continue
        raw = [it.extra[column] for it in items]
        values = np.array([age_band(v) if attribute == "age band" else (v or "unknown") for v in raw])
        rows = []
        for group in sorted(set(values), key=_order):
            m = values == group
            present = np.unique(y[m]).tolist()
            balanced = _balanced(y[m], pred[m])
            refused = int(np.isin(verdicts[m], ("ok", "uncertain"), invert=True).sum())
            mel_n = int((m & (y == mel)).sum())
            mel_hits = int((m & (y == mel) & (pred == mel)).sum())
            rows.append({"group": group, "images": int(m.sum()), "classes_present": len(present),
                         "balanced_accuracy": balanced, "balanced_accuracy_ci95": _bootstrap_ci(y[m], pred[m]),
                         "mel_images": mel_n,
                         "mel_recall": mel_hits / mel_n if mel_n else None,
                         "mel_recall_ci95": list(wilson(mel_hits, mel_n)) if mel_n else None,
                         "refused": refused / int(m.sum()), "refused_ci95": list(wilson(refused, int(m.sum()))),
                         "readable": bool(m.sum() >= MIN_READABLE)})
        out[attribute] = rows
    return out


def render_subgroups(tables: dict, title: str = "Subgroups") -> str:
    if not tables:
        return ("No subgroup table: the set carries no age, sex or body-site column. Skin type is not recorded in "
                "HAM10000 either; performance on darker skin is unknown.")
    parts = [f"## {title}", "",
             f"A refusal counts as a miss; balanced accuracy is over the classes present in the group; groups under "
             f"{MIN_READABLE} images are marked too small to read. Skin type is not recorded, so no table shows it: "
             "performance on darker skin is unknown.", ""]
    for attribute, rows in tables.items():
        parts += [f"| {attribute} | images | classes present | balanced accuracy (95 % CI, bootstrap) | melanomas "
                  "| melanoma recall (95 % CI) | refused (95 % CI) |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            ci = lambda key: f"({r[key][0]:.2f}-{r[key][1]:.2f})"  # noqa: E731
            mel = "-" if r["mel_recall"] is None else f"{r['mel_recall']:.2f} {ci('mel_recall_ci95')}"
            flag = "" if r["readable"] else " (too small to read)"
            parts.append(f"| {r['group']}{flag} | {r['images']} | {r['classes_present']} | "
                         f"{r['balanced_accuracy']:.3f} {ci('balanced_accuracy_ci95')} | {r['mel_images']} | {mel} | "
                         f"{r['refused']:.1%} ({r['refused_ci95'][0]:.1%}-{r['refused_ci95'][1]:.1%}) |")
        parts.append("")
    return "\n".join(parts)
