"""When an answer urges an examination: the concern threshold, chosen on validation, with its test figures.

Every answer carries `concern` (skinmodel.answers.concern): the calibrated probability of the concerning
(possibly malignant) classes together, and whether it reaches meta.json's threshold. The threshold is the highest
that still flags at least `--sensitivity` of the validation images whose lesion is of a concerning class; the
share of benign lesions flagged is its cost. Both are reported on the test split, never used for the choice,
beside the rule the page used before (a concerning class among the two most likely, or any at 25 % or more).

    python -m training concern --release release --variant release/int8   # a release's served weights and temperature
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from skinmodel.answers import format_prediction
from skinmodel.networks import build_model, load_state_dict_file
from skinmodel.release import ReleaseMeta
from training.common import data as D
from training.common.checkpoint import StudyError
from training.common.metrics import predict_logits

SENSITIVITY = 0.98  # share of the validation images of concerning lesions that must be flagged


def choose_threshold(share: np.ndarray, malignant: np.ndarray, sensitivity: float = SENSITIVITY) -> float:
    """The highest threshold t with mean(share[malignant] >= t) >= sensitivity: flag as few benign lesions as the
    sensitivity allows. share: the concerning classes' probability of each image; malignant: its label's kind."""
    scores = np.sort(share[malignant])
    if not len(scores):
        raise StudyError("no image of a concerning class: the concern threshold cannot be chosen")
    allowed_misses = int(np.floor((1.0 - sensitivity) * len(scores) + 1e-9))
    return float(scores[allowed_misses])


def figures(flagged: np.ndarray, malignant: np.ndarray) -> dict:
    """How a flagging rule does: the share of concerning lesions flagged, of benign ones flagged, of all."""
    return {"sensitivity": float(flagged[malignant].mean()), "benign_flagged": float(flagged[~malignant].mean()),
            "flagged": float(flagged.mean()), "images": int(len(flagged)), "concerning_images": int(malignant.sum())}


def served(probabilities: np.ndarray, meta: ReleaseMeta) -> tuple[np.ndarray, np.ndarray]:
    """Each row's concern as the service answers it (format_prediction itself, rounding included): the share it
    reports and its flag. The threshold is chosen on these very numbers, so validation flags exactly as measured."""
    answers = [format_prediction(p.tolist(), meta)["concern"] for p in probabilities]
    return (np.array([a["probability"] for a in answers]), np.array([a["flagged"] for a in answers], dtype=bool))


def choose_served_threshold(probabilities: np.ndarray, malignant: np.ndarray, meta: ReleaseMeta,
                            sensitivity: float = SENSITIVITY) -> float:
    """choose_threshold on the shares the service answers for these calibrated probabilities."""
    share, _ = served(probabilities, dataclasses.replace(meta, concern=None))
    return choose_threshold(share, malignant, sensitivity)


def served_probabilities(release: Path, meta: ReleaseMeta, data: D.DataConfig) -> dict[str, tuple]:
    """Calibrated probabilities and labels of the validation and test splits, from the weights a release serves."""
    if meta.weights_dtype == "int8":
        raise StudyError(f"{release} is an int8 variant: choose the threshold on its fp32 release (--variant)")
    model = build_model(meta.arch, meta.num_classes)
    model.load_state_dict(load_state_dict_file(release / meta.weights_file))
    split = D.load_split(data)
    if meta.split_hash and split.hash != meta.split_hash:
        raise StudyError(f"{release} was trained on another split (split seed {data.split_seed} gives {split.hash[:12]})")
    cfg, out = meta.preprocessing, {}
    for name in ("val", "test"):
        part = split.part(name)
        x = D.build_cache(part, "eval", cfg, data.cache, f"decode {name}")
        logits = predict_logits(model, x, cfg.mean, cfg.std)
        out[name] = (torch.softmax(logits / meta.temperature, dim=1).numpy(), np.array([r.label for r in part]))
    return out


def fit_concern(release: Path, data: D.DataConfig, sensitivity: float = SENSITIVITY, variants=()) -> dict:
    """Choose the threshold on validation, report it and the legacy rule on test, store it in meta.json (and in
    each variant's, e.g. the int8 network's, which answers with nearly the same probabilities)."""
    release = Path(release)
    meta = ReleaseMeta.load(release)
    data.use_threads()
    probs = served_probabilities(release, meta, data)
    concerning = [meta.class_names.index(c) for c in meta.concerning]
    malignant = {k: np.isin(y, concerning) for k, (_, y) in probs.items()}
    legacy = dataclasses.replace(meta, concern=None)
    threshold = choose_served_threshold(probs["val"][0], malignant["val"], meta, sensitivity)
    chosen = dataclasses.replace(meta, concern={"threshold": threshold})
    result = {"threshold": threshold, "target_sensitivity": sensitivity,
              "method": "the highest threshold on the concerning classes' summed calibrated probability that flags "
                        f"at least {sensitivity:.0%} of the validation images of concerning lesions",
              "val": figures(served(probs["val"][0], chosen)[1], malignant["val"]),
              "test": figures(served(probs["test"][0], chosen)[1], malignant["test"]),
              "test_legacy_rule": figures(served(probs["test"][0], legacy)[1], malignant["test"])}
    meta.concern = result
    meta.save(release)
    for variant in variants:
        other = ReleaseMeta.load(variant)
        if other.weights_sha256 == meta.weights_sha256 or other.split_hash != meta.split_hash:
            raise StudyError(f"{variant} is not a variant of {release}")
        other.concern = {**result, "carried_from": f"{meta.name} {meta.version}"}
        other.save(variant)
    t, old = result["test"], result["test_legacy_rule"]
    print(f"concern threshold {threshold:.3f} (validation: {result['val']['sensitivity']:.1%} of concerning lesions "
          f"flagged); test: {t['sensitivity']:.1%} flagged, benign {t['benign_flagged']:.1%} "
          f"(legacy rule: {old['sensitivity']:.1%}, benign {old['benign_flagged']:.1%}); wrote {release / 'meta.json'}")
    return result


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Choose on validation when an answer urges an examination (meta.json's "
                                            "concern threshold) and report it on test.", add_help=add_help)
    p.add_argument("--release", required=True, help="release folder: its weights, temperature and meta.json")
    p.add_argument("--variant", action="append", default=[],
                   help="a variant folder of the same network (the int8 one) to carry the threshold to; repeatable")
    p.add_argument("--sensitivity", type=float, default=SENSITIVITY,
                   help="share of validation images of concerning lesions to flag (default %(default)s)")
    D.add_data_args(p, sizes=False)
    return p


def main(args: argparse.Namespace) -> dict:
    if not 0.5 <= args.sensitivity <= 1.0:
        raise StudyError("--sensitivity must lie between 0.5 and 1")
    meta = ReleaseMeta.load(args.release)
    seed = (meta.training.get("args") or {}).get("split_seed", args.split_seed)
    data = dataclasses.replace(D.DataConfig.from_args(args), split_seed=seed)
    return fit_concern(Path(args.release), data, args.sensitivity, [Path(v) for v in args.variant])


if __name__ == "__main__":
    main(get_args_parser().parse_args())
