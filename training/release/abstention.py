"""Abstention for a release: when to say "uncertain" and when "not a dermoscopy image", chosen on validation.

- uncertain: the calibrated top probability below the value that flags --uncertain-share of validation lesions.
- not dermoscopy: a logistic "is this dermoscopy?" head on the penultimate features, fitted on the training
  lesions (each also under one random shift: training/release/shifts.py) against the fitting pool of pictures that are
  not dermoscopy (training/release/nonskin.py). Its strength is chosen on held-out pictures, its threshold is the score
  that keeps --lesion-keep of the validation lesions of every class, each pooled with its copies under the ten
  shift families (each family's own rate is reported on test, not guaranteed). It replaced release 1.0's
  Mahalanobis distance, which refused real lesions that merely looked unlike HAM10000 (vascular lesions,
  other white balance, other zoom).

Reported on the test split (per class, per shift family) and on pictures the head never saw (scikit-image's
photographs and faces, drawn pictures of another seed). Writes ood_stats.pt, meta.json's "abstention" and
gate_scores.png (where the scores of each group fall against the threshold).

    python -m training trust --release release
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score as balanced_accuracy
from tqdm import tqdm

from skinmodel.networks import build_model, features_and_logits, load_state_dict_file, ood_score
from skinmodel.preprocessing import preprocess_bytes
from skinmodel.release import ReleaseMeta
from training.common import data as D
from training.common.checkpoint import StudyError, atomic_save
from training.common.device import add_device_args, full_fp32, resolve_device
from training.release.nonskin import evaluation_sets, fitting_negatives
from training.common.plots import plot_gate_scores
from training.release.shifts import FAMILIES, shifted

STRENGTHS = (0.01, 0.1, 1.0)  # inverse L2 strengths of the head tried; chosen on held-out pictures
UNCERTAIN_SHARE = 0.2  # share of validation lesions answered "uncertain"
LESION_KEEP = 0.995  # share of the validation lesions of every class (plain and shifted, pooled) the gate accepts


def auroc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """P(score of a non-dermoscopy picture > score of a lesion), ties counted half."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(positive_scores)), np.zeros(len(negative_scores))]
    return float(roc_auc_score(y, np.r_[positive_scores, negative_scores]))


@torch.no_grad()
def features(model, meta: ReleaseMeta, blobs: list[bytes], desc: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Penultimate features, calibrated top probabilities and predicted classes of image files, computed as the
    handler computes them."""
    feats, tops, preds = [], [], []
    device = next(model.parameters()).device  # features come from the fp32 network, never the int8 one
    with full_fp32():  # decoding dominates on a GPU machine: in threads
        for i in tqdm(range(0, len(blobs), 128), desc=desc, unit="batch", leave=False):
            x = torch.stack(list(D.thread_map(lambda b: preprocess_bytes(b, meta.preprocessing), blobs[i:i + 128])))
            f, logits = (t.float().cpu() for t in features_and_logits(model, x.to(device)))
            probs = (logits / meta.temperature).softmax(1)
            feats.append(f)
            tops.append(probs.max(1).values)
            preds.append(probs.argmax(1))
    return torch.cat(feats), torch.cat(tops), torch.cat(preds).numpy()


def fit_head(lesions: torch.Tensor, others: torch.Tensor, strength: float) -> dict:
    """Logistic regression, lesions vs pictures, on standardised features: the statistics the handler scores
    with (skinmodel.networks.ood_score: the logit of "not dermoscopy")."""
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([lesions, others]).double()
    mean, scale = x.mean(0), x.std(0) + 1e-6
    y = np.r_[np.zeros(len(lesions)), np.ones(len(others))]
    clf = LogisticRegression(C=strength, class_weight="balanced", max_iter=5000).fit(((x - mean) / scale).numpy(), y)
    return {"mean": mean.float(), "scale": scale.float(), "weight": torch.from_numpy(clf.coef_[0]).float(),
            "bias": torch.tensor(float(clf.intercept_[0]))}


def _load(path) -> Image.Image:
    with Image.open(path) as img:  # closed at once: thousands of lazily opened files exhaust descriptors
        return img.convert("RGB")


def _shifted_sets(records: list[D.Record], seed: int):
    """(family, files): every record under each shift family in turn (a different draw per image and family);
    one family's files at a time, since "source resolution" makes files several times the original's size."""
    images = list(D.thread_map(lambda r: _load(r.path), records))
    for f, family in enumerate(tqdm(FAMILIES, desc="shifting", unit="family", leave=False)):
        # every draw is seeded by its image: in threads, the same files as one by one
        yield family, list(D.thread_map(lambda i: shifted(images[i], family, seed + 1000 * f + i), range(len(images))))


def _share(scores, threshold: float, mask=None):
    """Share of scores above the threshold; None where the mask selects nothing (no NaN in meta.json)."""
    s = scores if mask is None else scores[mask]
    return float((s > threshold).mean()) if len(s) else None


def fit_abstention(release: Path, data: D.DataConfig, uncertain_share: float = UNCERTAIN_SHARE,
                   lesion_keep: float = LESION_KEEP, seed: int = 0, version: str | None = None,
                   device: str = "auto") -> dict:
    """Fit, measure and write the abstention of a release. A new `version` names the result: the same weights
    with another gate answer differently, and the audit trail records the version with each answer."""
    release = Path(release)
    meta = ReleaseMeta.load(release)
    split = D.load_split(data)
    if split.hash != meta.split_hash:
        raise StudyError("the release was trained on another split than --data / --split-seed make")
    model = build_model(meta.arch, meta.num_classes)
    model.load_state_dict(load_state_dict_file(release / meta.weights_file))
    model.eval().to(resolve_device(device))
    data.use_threads()
    labels = {name: np.array([r.label for r in split.part(name)]) for name in ("val", "test")}
    read = lambda recs: [open(r.path, "rb").read() for r in recs]  # noqa: E731

    train_recs = split.part("train")
    rng = np.random.default_rng(seed)
    families = list(FAMILIES)
    picks = [families[int(rng.integers(len(families)))] for _ in train_recs]  # drawn in order, as always
    train_shifted = list(D.thread_map(lambda i: shifted(_load(train_recs[i].path), picks[i], 10_000_000 + i),
                                      range(len(train_recs))))
    lesions = torch.cat([features(model, meta, read(train_recs), "train")[0],
                         features(model, meta, train_shifted, "train, shifted")[0]])
    fitting = {part: fitting_negatives(part, seed + 1) for part in ("train", "val")}
    others = features(model, meta, fitting["train"], "pictures")[0]
    held_out = features(model, meta, fitting["val"], "held-out pictures")[0]

    val_plain, val_top, _ = features(model, meta, read(split.part("val")), "val")
    val_shift = {fam: features(model, meta, blobs, f"val, {fam}")[0]
                 for fam, blobs in _shifted_sets(split.part("val"), 20_000_000)}
    candidates = []
    for strength in STRENGTHS:
        stats = fit_head(lesions, others, strength)
        val_scores = [ood_score(f, stats) for f in (val_plain, *val_shift.values())]
        pooled, classes = torch.cat(val_scores), np.tile(labels["val"], len(val_scores))
        # Keep lesion_keep of the validation lesions overall and of every class: rare classes (vasc, df) must
        # not pay for the common ones, which a pooled quantile alone would let happen.
        threshold = max(float(torch.quantile(pooled, lesion_keep)),
                        *(float(torch.quantile(pooled[torch.from_numpy(classes == k)], lesion_keep))
                          for k in range(meta.num_classes) if (classes == k).any()))
        worst_family = max(float((v > threshold).float().mean()) for v in val_scores)
        rejected = float((ood_score(held_out, stats) > threshold).float().mean())
        print(f"head C={strength:g}: keeps {float((pooled <= threshold).float().mean()):.1%} of validation lesions "
              f"(worst shift family refused {worst_family:.1%}), rejects {rejected:.1%} of held-out pictures",
              flush=True)
        # Most held-out pictures refused; among equals (to 0.1 %), the most even over the shift families.
        candidates.append(((round(rejected, 3), -worst_family), rejected, strength, stats, threshold))
    _, held_out_rejected, strength, stats, threshold = max(candidates, key=lambda c: c[0])
    uncertain_below = float(torch.quantile(val_top, uncertain_share))

    test_plain, test_top, test_pred = features(model, meta, read(split.part("test")), "test")
    test_scores = ood_score(test_plain, stats).numpy()
    y, mel = labels["test"], meta.class_names.index("mel")
    per_class = {c: _share(test_scores, threshold, y == k) for k, c in enumerate(meta.class_names)}
    per_family = {"unshifted": {"all": _share(test_scores, threshold), "mel": _share(test_scores, threshold, y == mel),
                           "balanced_accuracy": balanced_accuracy(y, test_pred)}}
    shifted_scores = []
    for fam, blobs in _shifted_sets(split.part("test"), 30_000_000):
        feats, _, pred = features(model, meta, blobs, f"test, {fam}")
        s = ood_score(feats, stats).numpy()
        shifted_scores.append(s)
        # How much worse the classifier gets under the shift: the gate must not be the only thing watched.
        per_family[fam] = {"all": _share(s, threshold), "mel": _share(s, threshold, y == mel),
                           "balanced_accuracy": balanced_accuracy(y, pred)}
    non_skin, everything = {}, {}
    for name, blobs in evaluation_sets(fitting["train"] + fitting["val"]).items():
        s = ood_score(features(model, meta, blobs, name)[0], stats).numpy()
        everything[name] = s
        non_skin[name] = {"images": len(blobs), "rejected": float((s > threshold).mean()),
                          "auroc": auroc(s, test_scores)}
    correct = test_pred == y
    confident = test_top.numpy() >= uncertain_below
    result = {
        "uncertain_below": uncertain_below, "ood_score_above": threshold,
        "ood_method": "logistic 'is this dermoscopy' head on penultimate features: training lesions (plain and "
                      "shifted) vs packaged and drawn pictures; threshold keeps "
                      f"{lesion_keep:.1%} of the validation lesions of every class, pooled with their copies "
                      f"under {len(FAMILIES)} shift families",
        "ood_head_strength": strength, "held_out_pictures_rejected": held_out_rejected,
        "test_lesions_rejected_as_ood": float((test_scores > threshold).mean()),
        "test_rejected_per_class": per_class, "test_rejected_per_shift": per_family,
        "test_ood_auroc_all": auroc(np.concatenate(list(everything.values())), test_scores), "non_skin_sets": non_skin,
        "test_uncertain_share": float((~confident).mean()),
        "test_accuracy_confident": float(correct[confident].mean()) if confident.any() else None,
        "test_accuracy_uncertain": float(correct[~confident].mean()) if (~confident).any() else None,
    }
    plot_gate_scores({"test lesions": test_scores, f"test lesions, {len(FAMILIES)} shifts": np.concatenate(shifted_scores),
                      **everything}, threshold, release / "gate_scores.png")
    atomic_save(stats, release / "ood_stats.pt")  # float32 (6 KB): the handler scores exactly as measured here
    meta.abstention = {**result, "ood_stats_file": "ood_stats.pt"}
    meta.version = version or meta.version
    meta.save(release)
    print(render_table(result))
    return result


def render_table(ab: dict) -> str:
    """The false-refusal table of README and the model card."""
    classes = ab["test_rejected_per_class"]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731  (None: no lesion of that class in the split)
    lines = [f"Real test lesions answered `not_dermoscopy`: {ab['test_lesions_rejected_as_ood']:.1%} overall; per "
             "class " + ", ".join(f"{c} {pct(v)}" for c, v in classes.items()) + ".", "",
             "| shift family (test split) | lesions refused | melanomas refused | balanced accuracy |",
             "|---|---|---|---|"]
    lines += [f"| {fam} | {pct(v['all'])} | {pct(v['mel'])} | {v.get('balanced_accuracy', float('nan')):.3f} |"
              for fam, v in ab["test_rejected_per_shift"].items()]
    lines += ["", "| pictures that are not dermoscopy (never fitted on) | images | refused | AUROC vs test lesions |",
              "|---|---|---|---|"]
    lines += [f"| {name} | {v['images']} | {v['rejected']:.0%} | {v['auroc']:.3f} |"
              for name, v in ab["non_skin_sets"].items()]
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Choose the 'uncertain' and 'not dermoscopy' thresholds of a release "
                                            "on validation; report them on test, shifted test and other pictures.",
                                add_help=add_help)
    p.add_argument("--release", required=True, help="folder with meta.json (calibrated first) and the weights")
    D.add_data_args(p, sizes=False)
    p.add_argument("--uncertain-share", type=float, default=UNCERTAIN_SHARE,
                   help="share of validation lesions flagged uncertain")
    p.add_argument("--lesion-keep", type=float, default=LESION_KEEP,
                   help="share of the validation lesions of every class (plain and shifted) the gate must accept")
    p.add_argument("--version", default=None, help="new version for the release (default: keep meta.json's)")
    add_device_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    return fit_abstention(Path(args.release), D.DataConfig.from_args(args), args.uncertain_share, args.lesion_keep,
                          version=args.version, device=args.device)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
