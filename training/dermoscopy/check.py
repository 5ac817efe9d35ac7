"""The dermoscopy check of a release: when to say "uncertain" and when "not a dermoscopy image", chosen on
validation.

- uncertain (confidence): the calibrated top probability below the value that flags --uncertain-share of
  validation lesions.
- the dermoscopy check's score on the penultimate features and the picture's colour statistics before the colour
  constancy (skinmodel.networks.check_inputs; training/dermoscopy/rejectors.py compares a logistic
  head on the old pool and on the packages' pool, the energy score and a nearest-neighbour score on VALIDATION
  sources and keeps the best servable one). Lesions: the training lesions, plain and each under one random shift
  (training/dermoscopy/shifts.py); pictures that are not dermoscopy: whole sources (packages,
  training/dermoscopy/pool.py), fit, val and test sources disjoint. Two thresholds: above `refuse_above` (keeps
  one of --lesion-keep's shares of the validation lesions of every class, pooled with their copies under the ten
  shift families: the smallest whose validation lesion refusals stay within rejectors.LESION_LIMITS) the answer
  is `not_dermoscopy`; between `clear_below` and it, `uncertain`, never `ok`.

Reported on the test split (per class, per shift family) and on the test sources, never fitted on nor chosen on.
Features are computed once per release and cached (--cache-dir). Writes dermoscopy_check.pt (the statistics),
meta.json's "dermoscopy_check", dermoscopy_scores.png and dermoscopy_pool.json.

    python -m training.dermoscopy.pool --install     # once per machine (root): the Debian packages of the pool
    python -m training dermoscopy-check --release release --version 1.2
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score as balanced_accuracy

from skinmodel.networks import (build_model, check_statistics_width, load_check_statistics, load_state_dict_file,
                                name_colour_layout, validate_check_statistics)
from skinmodel.release import CHECK_STATS_FILE, ReleaseMeta
from training.common import data as D
from training.dermoscopy import pool
from training.dermoscopy import rejectors as R
from training.common.checkpoint import StudyError, atomic_save
from training.common.device import add_device_args, resolve_device
from training.dermoscopy.features import lesion_features
from training.common.plots import plot_check_scores
from training.dermoscopy.shifts import FAMILIES

UNCERTAIN_SHARE = 0.2  # share of validation lesions answered "uncertain"
LESION_KEEPS = R.LESION_KEEPS  # shares of the validation lesions of every class (plain + shifted) the check may keep
SCORES_PNG = "dermoscopy_scores.png"  # where each group's scores fall against the threshold
POOL_JSON = "dermoscopy_pool.json"  # the pool's sources with their package versions, licences and file counts


def auroc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """P(score of a non-dermoscopy picture > score of a lesion), ties counted half."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(positive_scores)), np.zeros(len(negative_scores))]
    return float(roc_auc_score(y, np.r_[positive_scores, negative_scores]))


def fit_head(lesions: torch.Tensor, others: torch.Tensor, strength: float) -> dict:
    """Logistic regression, lesions vs pictures (one source), on standardised features: the statistics the
    handler scores with (skinmodel.networks.dermoscopy_check_score: the logit of "not dermoscopy")."""
    return R.fit_logistic(lesions, [others], strength, per_source=False)


def _share(scores, threshold: float, mask=None):
    """Share of scores above the threshold; None where the mask selects nothing (no NaN in meta.json)."""
    s = scores if mask is None else scores[mask]
    return float((s > threshold).mean()) if len(s) else None


def _lesion_report(score, test: dict, refuse: float, clear: float, uncertain_below: float, meta) -> dict:
    """False refusals of real test lesions: overall, per class, per shift family; and the share the dermoscopy
    check makes uncertain."""
    y, mel = test["labels"].numpy(), meta.class_names.index("mel")
    s = score(test["plain"]).numpy()
    fams = {"unshifted": (s, test["pred"].numpy())}
    fams.update({f: (score(test["shift"][f]).numpy(), test["shift_pred"][f].numpy()) for f in FAMILIES})
    top = test["top"].numpy()
    confident = (top >= uncertain_below) & (s <= clear)
    correct = test["pred"].numpy() == y
    return {
        "test_lesions_refused": _share(s, refuse),
        "test_lesions_check_uncertain": float(((s > clear) & (s <= refuse)).mean()),
        "test_rejected_per_class": {c: _share(s, refuse, y == k) for k, c in enumerate(meta.class_names)},
        "test_rejected_per_shift": {f: {"all": _share(v, refuse), "mel": _share(v, refuse, y == mel),
                                        "balanced_accuracy": balanced_accuracy(y, p)} for f, (v, p) in fams.items()},
        "test_uncertain_share": float((~confident).mean()),
        "test_accuracy_confident": float(correct[confident].mean()) if confident.any() else None,
        "test_accuracy_uncertain": float(correct[~confident].mean()) if (~confident).any() else None,
    }, fams


def _source_report(score, pics: dict, names: list[str], lesion_scores: np.ndarray, refuse: float, clear: float,
                   uncertain_below: float) -> tuple[dict, dict]:
    per, scores = {}, {}
    for name in names:
        s = score(pics[name]["feats"])
        scores[name] = s.numpy()
        per[name] = {**R.verdict_shares(s, pics[name]["top"], refuse, clear, uncertain_below),
                     "auroc": auroc(scores[name], lesion_scores)}
    return per, scores


def _columns_read(stats: dict, features: int) -> str:
    """What the chosen rejector reads of the check's inputs (skinmodel.networks.check_inputs)."""
    width = check_statistics_width(stats)
    return (f"the {features} penultimate features and the picture's {width - features} colour statistics before the "
            "colour constancy" if width > features else f"the {features} penultimate features")


def _pooled(per: dict) -> dict:
    n = sum(v["images"] for v in per.values())
    return {k: sum(v[k] * v["images"] for v in per.values()) / n for k in ("not_dermoscopy", "uncertain", "ok")} | {
        "images": n}


def _load_release(release: Path, data: D.DataConfig, device: str):
    meta = ReleaseMeta.load(release)
    split = D.load_split(data)
    if split.hash != meta.split_hash:
        raise StudyError("the release was trained on another split than --data / --split-seed make")
    model = build_model(meta.arch, meta.num_classes)
    model.load_state_dict(load_state_dict_file(release / meta.weights_file))
    return meta, split, model.eval().to(resolve_device(device))


def _shipped_check(release: Path, meta: ReleaseMeta, features: int) -> dict | None:
    """The release's current check, a candidate like the others if this code can serve it (width, colour layout)."""
    path = meta.check_stats_path(release)
    if path is None:
        return None
    stats = load_check_statistics(path)
    try:
        validate_check_statistics(stats, features)
    except ValueError as err:
        print(f"the shipped check is left out of the comparison: {err}", flush=True)
        return None
    return stats


def fit_dermoscopy_check(release: Path, data: D.DataConfig, uncertain_share: float = UNCERTAIN_SHARE,
                         lesion_keeps: tuple[float, ...] = LESION_KEEPS, seed: int = 0, version: str | None = None,
                         device: str = "auto") -> dict:
    """Choose, measure and write the dermoscopy check of a release. A new `version` names the result: the same
    weights with another check answer differently, and the audit trail records the version with each answer."""
    release = Path(release)
    meta, split, model = _load_release(release, data, device)
    data.use_threads()
    weights = release / meta.weights_file
    try:
        pool.install()
    except (OSError, subprocess.CalledProcessError) as err:  # offline or not root: measured on what is there
        print(f"warning: the dermoscopy check's picture sources could not be installed ({err})", flush=True)
    les = lesion_features(model, meta, weights, split, data.cache, seed)
    pics = R.pool_features(model, meta, weights, data.cache, seed)
    parts = {p: [s for s in pool.sources(p) if s.name in pics] for p in pool.PARTS}
    uncertain_below = float(torch.quantile(les["val"]["top"], uncertain_share))
    old_stats = _shipped_check(release, meta, model.fc.in_features)
    train_labels = torch.tensor([r.label for r in split.part("train")])
    cands = R.candidates(torch.cat([les["train"]["plain"], les["train"]["shifted"]]), train_labels.repeat(2),
                         [pics[s.name]["feats"] for s in parts["fit"]], old_stats,
                         model.fc.cpu(), les["train"]["plain"])
    best, table = R.compare(cands, les["val"], {s.name: pics[s.name] for s in parts["val"]},
                            uncertain_below, tuple(lesion_keeps))
    refuse, clear = table[best.name]["refuse_above"], table[best.name]["clear_below"]
    lesion, fams = _lesion_report(best.score, les["test"], refuse, clear, uncertain_below, meta)
    test_names = [s.name for s in parts["test"]]
    per_source, scores = _source_report(best.score, pics, test_names, fams["unshifted"][0], refuse, clear,
                                        uncertain_below)
    result = {
        "uncertain_below": uncertain_below, "refuse_above": refuse, "clear_below": clear,
        "method": f"{best.name} on {_columns_read(best.stats, model.fc.in_features)}: lesions (training split, "
                  f"plain and shifted) vs pictures of the fitting "
                  f"sources; chosen among {len(cands)} rejectors on {len(table[best.name]['per_source'])} "
                  f"validation sources; refuses above a score that keeps {table[best.name]['lesion_keep']:.1%} of the "
                  f"validation lesions of every class (plain and under {len(FAMILIES)} shift families; the "
                  f"smallest of {', '.join(f'{k:.1%}' for k in lesion_keeps)} whose validation lesions refused stay "
                  f"within {R.LESION_LIMITS['all']:.2%} in all, {R.LESION_LIMITS['class']:.2%} per class and "
                  f"{R.LESION_LIMITS['family']:.0%} per shift family), uncertain above "
                  f"the {table[best.name]['clear_keep']:.1%} lesion quantile",
        "rejector": best.name, "rejector_comparison": {n: {k: v for k, v in r.items() if k != "per_source"}
                                                       | {"validation_sources": r["per_source"]}
                                                       for n, r in table.items()},
        **lesion, "non_skin_sets": per_source, "held_out_sources": _pooled(per_source),
        "test_auroc_all": auroc(np.concatenate(list(scores.values())), fams["unshifted"][0]),
        "sources": {p: [s.name for s in sources] for p, sources in parts.items()},
    }
    plot_check_scores({"test lesions": fams["unshifted"][0],
                       f"test lesions, {len(FAMILIES)} shifts": np.concatenate([fams[f][0] for f in FAMILIES]),
                       **scores}, refuse, release / SCORES_PNG)
    # float32: the handler scores exactly as measured here
    atomic_save(name_colour_layout(best.stats, model.fc.in_features), release / CHECK_STATS_FILE)
    meta.dermoscopy_check = {**result, "stats_file": CHECK_STATS_FILE}
    meta.version = version or meta.version
    meta.save(release)
    (release / POOL_JSON).write_text(json.dumps(
        pool.manifest({n: len(p["feats"]) for n, p in pics.items()}), indent=2) + "\n")
    print(render_comparison(result))
    print(render_table(result))
    return result


def render_comparison(check: dict) -> str:
    """The rejectors compared on validation sources (README and model card)."""
    lines = ["| rejector (validation sources) | lesions kept | refused, mean over sources | worst source | "
             "answered ok | worst shift family, lesions refused |", "|---|---|---|---|---|---|"]
    for name, r in check["rejector_comparison"].items():
        mark = " (chosen)" if name == check["rejector"] else ""
        kept = f"{r['lesion_keep']:.1%}" if "lesion_keep" in r else "99.5%"  # before the choice, always 99.5 %
        lines.append(f"| {name}{mark} | {kept} | {r['mean_refused']:.1%} | {r['min_refused']:.1%} | "
                     f"{r['mean_ok']:.1%} | {r['worst_family_refused']:.1%} |")
    return "\n".join(lines)


def render_table(check: dict) -> str:
    """The false-refusal table and the held-out sources' table of README and the model card, from meta.json's
    dermoscopy_check."""
    classes = check["test_rejected_per_class"]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731  (None: no lesion of that class in the split)
    lines = [f"Real test lesions answered `not_dermoscopy`: {check['test_lesions_refused']:.1%} overall; per "
             "class " + ", ".join(f"{c} {pct(v)}" for c, v in classes.items()) + ".", "",
             "| shift family (test split) | lesions refused | melanomas refused | balanced accuracy |",
             "|---|---|---|---|"]
    lines += [f"| {fam} | {pct(v['all'])} | {pct(v['mel'])} | {v.get('balanced_accuracy', float('nan')):.3f} |"
              for fam, v in check["test_rejected_per_shift"].items()]
    lines += ["", "| held-out sources, not dermoscopy (never fitted on, never chosen on) | images | "
              "`not_dermoscopy` | `uncertain` | `ok` | AUROC vs test lesions |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {v['images']} | {pct(v.get('not_dermoscopy', v.get('rejected')))} | "
              f"{pct(v.get('uncertain'))} | {pct(v.get('ok'))} | {v['auroc']:.3f} |"
              for name, v in check["non_skin_sets"].items()]
    if "held_out_sources" in check:
        h = check["held_out_sources"]
        lines.append(f"| all held-out sources | {h['images']} | {pct(h['not_dermoscopy'])} | {pct(h['uncertain'])} | "
                     f"{pct(h['ok'])} | {check['test_auroc_all']:.3f} |")
    if "rejector_comparison" in check:  # releases from 1.2 on: how the check was chosen, and its two thresholds
        sources = check["sources"]
        lines = [f"Dermoscopy check: {check['rejector']}, chosen on the validation sources "
                 f"({', '.join(sources['val'])}); fitted on {', '.join(sources['fit'])}. Score above {check['refuse_above']:.3f}: "
                 f"`not_dermoscopy`; between {check['clear_below']:.3f} and it: `uncertain`, never `ok` "
                 f"({check['test_lesions_check_uncertain']:.1%} of real test lesions).", "",
                 render_comparison(check), "", *lines]
    return "\n".join(lines)


def carry_check(release: Path, variant: Path) -> None:
    """A variant of the release with the same weights (the int8 folder) gets the new dermoscopy check: statistics,
    thresholds and version (the variant's own suffix kept), so it answers with the check this run measured."""
    import shutil

    meta, var = ReleaseMeta.load(release), ReleaseMeta.load(variant)
    suffix = var.version.split("-", 1)[1] if "-" in var.version else ""
    var.dermoscopy_check = meta.dermoscopy_check
    var.version = f"{meta.version}-{suffix}" if suffix else meta.version
    for name in (CHECK_STATS_FILE, SCORES_PNG):
        shutil.copy(release / name, variant / name)
    var.save(variant)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Choose the 'uncertain' and 'not dermoscopy' thresholds of a release "
                                            "on validation; report them on test, shifted test and other pictures.",
                                add_help=add_help)
    p.add_argument("--release", required=True, help="folder with meta.json (calibrated first) and the weights")
    D.add_data_args(p, sizes=False)
    p.add_argument("--uncertain-share", type=float, default=UNCERTAIN_SHARE,
                   help="share of validation lesions flagged uncertain")
    p.add_argument("--lesion-keep", type=float, nargs="+", default=list(LESION_KEEPS),
                   help="shares of the validation lesions of every class (plain and shifted) the check may keep: "
                        "the smallest whose validation lesion refusals stay within the limits is used")
    p.add_argument("--version", default=None, help="new version for the release (default: keep meta.json's)")
    p.add_argument("--variant", action="append", default=[], type=Path,
                   help="a folder of the same release's other weights (release/int8) to carry the new check to")
    add_device_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    result = fit_dermoscopy_check(Path(args.release), D.DataConfig.from_args(args), args.uncertain_share,
                                  args.lesion_keep, version=args.version, device=args.device)
    for variant in args.variant:
        carry_check(Path(args.release), variant)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
