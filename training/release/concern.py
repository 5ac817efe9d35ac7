"""When an answer urges an examination: the concern rule of a release, chosen on validation, with its test figures.

Every answer carries `concern` (skinmodel.answers.concern): the calibrated probability of the concerning (possibly
malignant) classes together and whether it is flagged. Here a release gets its rule, on its own served network
(fp32 or int8) and temperature: the highest threshold that flags at least `--sensitivity` of the validation images
whose lesion is of a concerning class, and never fewer than the former rule flags (a concerning class among the
two most likely, or any at 25 % or more). The threshold is adopted if it flags fewer benign validation lesions than
the former rule; otherwise the release keeps the former rule. Test figures of both are recorded, never used.

    python -m training concern --release release        # then --release release/int8, each network its own
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
    """Each row's concern as the service answers a lesion it does not refuse (format_prediction itself, rounding
    included): the share it reports and its flag. The threshold is chosen on these very numbers, so validation
    flags exactly as measured."""
    answers = [format_prediction(p.tolist(), meta)["concern"] for p in probabilities]
    return (np.array([a["probability"] for a in answers]), np.array([a["flagged"] for a in answers], dtype=bool))


def choose_served_threshold(probabilities: np.ndarray, malignant: np.ndarray, meta: ReleaseMeta,
                            sensitivity: float = SENSITIVITY) -> float:
    """choose_threshold on the shares the service answers for these calibrated probabilities."""
    share, _ = served(probabilities, dataclasses.replace(meta, concern=None))
    return choose_threshold(share, malignant, sensitivity)


def served_probabilities(release: Path, meta: ReleaseMeta, data: D.DataConfig) -> dict[str, tuple]:
    """Calibrated probabilities and labels of the validation and test splits, from the network a release serves."""
    model = build_model(meta.arch, meta.num_classes)  # resnet18_int8 too: the handler's own loading
    model.load_state_dict(load_state_dict_file(release / meta.weights_file))
    split = D.load_split(data)
    if meta.split_hash and split.hash != meta.split_hash:
        raise StudyError(f"{release} was trained on another split (split seed {data.split_seed} gives "
                         f"{split.hash[:12]}; limit per class {data.limit_per_class})")
    cfg, out = meta.preprocessing, {}
    for name in ("val", "test"):
        part = split.part(name)
        x = D.build_cache(part, "eval", cfg, data.cache, f"decode {name}")
        logits = predict_logits(model, x, cfg.mean, cfg.std)
        out[name] = (torch.softmax(logits / meta.temperature, dim=1).numpy(), np.array([r.label for r in part]))
    return out


def choose_rule(val: tuple, test: tuple, meta: ReleaseMeta, sensitivity: float = SENSITIVITY) -> dict:
    """meta.json's concern from (probabilities, labels) of validation and test: the threshold and its figures, or
    threshold None where the former rule flags fewer benign validation lesions at the sensitivity asked for."""
    concerning = [meta.class_names.index(c) for c in meta.concerning]
    malignant = [np.isin(labels, concerning) for _, labels in (val, test)]
    if not malignant[0].any():
        raise StudyError("no validation image of a concerning class: the concern threshold cannot be chosen")
    former = dataclasses.replace(meta, concern=None)
    former_val = figures(served(val[0], former)[1], malignant[0])
    target = max(sensitivity, former_val["sensitivity"])  # never fewer malignant lesions flagged than before
    threshold = choose_served_threshold(val[0], malignant[0], meta, target)
    chosen = dataclasses.replace(meta, concern={"threshold": threshold})
    chosen_val = figures(served(val[0], chosen)[1], malignant[0])
    adopted = chosen_val["benign_flagged"] < former_val["benign_flagged"]
    return {"threshold": threshold if adopted else None, "candidate_threshold": threshold,
            "target_sensitivity": sensitivity,
            "method": "the highest threshold on the concerning classes' summed calibrated probability that flags at "
                      f"least {target:.1%} of the validation images of concerning lesions ({sensitivity:.0%}, or "
                      "the former rule's share if higher), adopted if it flags fewer benign validation lesions",
            "val": chosen_val, "val_former_rule": former_val,
            "test": figures(served(test[0], chosen)[1], malignant[1]),
            "test_former_rule": figures(served(test[0], former)[1], malignant[1])}


def fit_concern(release: Path, data: D.DataConfig, sensitivity: float = SENSITIVITY) -> dict:
    """Choose a release's concern rule on validation, with test figures, and store it in its meta.json."""
    release = Path(release)
    meta = ReleaseMeta.load(release)
    if not meta.concerning:
        raise StudyError(f"{release / 'meta.json'} names no concerning class: nothing to flag")
    data.use_threads()
    probs = served_probabilities(release, meta, data)
    result = choose_rule(probs["val"], probs["test"], meta, sensitivity)
    meta.concern = result
    meta.save(release)
    t, old = result["test"], result["test_former_rule"]
    rule = (f"threshold {result['threshold']:.3f}" if result["threshold"] is not None else
            f"former rule kept (threshold {result['candidate_threshold']:.3f} would flag more benign lesions)")
    print(f"concern: {rule}; validation: {result['val']['sensitivity']:.1%} of concerning lesions flagged; test: "
          f"threshold {t['sensitivity']:.1%}, benign {t['benign_flagged']:.1%}; former rule {old['sensitivity']:.1%}, "
          f"benign {old['benign_flagged']:.1%}; wrote {release / 'meta.json'}")
    return result


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Choose on validation when an answer urges an examination (meta.json's "
                                            "concern) and report it on test.", add_help=add_help)
    p.add_argument("--release", required=True, help="release folder: its weights, temperature and meta.json")
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
    return fit_concern(Path(args.release), data, args.sensitivity)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
