"""Abstention thresholds for the release model, chosen on validation and evaluated on test + non-skin images.

- "uncertain": calibrated top probability below the value that flags --uncertain-share of validation lesions.
- "not a dermoscopy image": Mahalanobis distance of the penultimate features (class means and shared covariance
  from the training split) above the value that keeps --ood-keep of validation lesions.
Writes ood_stats.pt beside the weights and the thresholds + measured figures into meta.json.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch

from skinmodel.formats import sniff
from skinmodel.networks import features_and_logits, fit_class_gaussians, mahalanobis_distance
from skinmodel.preprocessing import normalize, preprocess_bytes
from skinmodel.release import ReleaseMeta
from training import data as D
from training.checkpoint import StudyError, atomic_save, checkpoint_preprocessing, model_from_checkpoint


def non_skin_images(seed: int = 0, generated: int = 100) -> dict[str, list[bytes]]:
    """Natural photographs that ship inside scikit-image, its face crops, and generated non-skin pictures."""
    from PIL import Image

    def png(arr) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        return buf.getvalue()

    out = {"scikit-image photographs": [], "LFW faces (scikit-image)": [], "generated": []}
    import skimage

    data_dir = Path(skimage.__file__).parent / "data"
    for f in sorted(data_dir.iterdir()):
        if f.suffix.lower() in (".png", ".jpg", ".gif") and f.stat().st_size > 2000:
            data = f.read_bytes()
            # The service decodes only the formats the page lists; a GIF keeps its pixels as a PNG.
            out["scikit-image photographs"].append(data if sniff(data) else png(np.asarray(Image.open(f).convert("RGB"))))
    faces = np.load(data_dir / "lfw_subset.npy")
    out["LFW faces (scikit-image)"] = [png((face * 255).astype(np.uint8)) for face in faces[:100]]
    rng = np.random.default_rng(seed)
    for i in range(generated):
        kind = i % 5
        h, w = 150, 200
        if kind == 0:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noise
        elif kind == 1:
            arr = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)  # flat colour
        elif kind == 2:
            g = np.linspace(0, 255, w, dtype=np.uint8)
            arr = np.stack([np.tile(g, (h, 1))] * 3, -1)[..., rng.permutation(3)]  # gradient
        elif kind == 3:
            s = int(rng.integers(5, 40))
            board = ((np.indices((h, w)) // s).sum(0) % 2 * 255).astype(np.uint8)
            arr = np.stack([board] * 3, -1)  # checkerboard
        else:
            arr = np.full((h, w, 3), 255, np.uint8)  # a "document": dark strokes on white
            for _ in range(30):
                y, x = rng.integers(0, h - 5), rng.integers(0, w - 40)
                arr[y:y + 3, x:x + int(rng.integers(10, 40))] = 20
        out["generated"].append(png(arr))
    return out


def auroc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """P(score of an OOD image > score of a lesion), ties counted half."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(positive_scores)), np.zeros(len(negative_scores))]
    return float(roc_auc_score(y, np.r_[positive_scores, negative_scores]))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Choose 'uncertain' and 'not dermoscopy' thresholds on validation.",
                                add_help=add_help)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--release", required=True, help="folder with meta.json (calibrated first)")
    D.add_data_args(p, sizes=False)
    p.add_argument("--uncertain-share", type=float, default=0.2, help="share of validation lesions flagged uncertain")
    p.add_argument("--ood-keep", type=float, default=0.95, help="share of validation lesions accepted as dermoscopy")
    return p


@torch.no_grad()
def _scores(model, x, t, stats=None):
    feats, logits = features_and_logits(model, x)
    top = (logits / t).softmax(1).max(1).values
    dist = mahalanobis_distance(feats, stats["means"], stats["precision"]) if stats else None
    return feats, logits, top, dist


def fit_abstention(checkpoint: str, release: Path, data: D.DataConfig, uncertain_share: float = 0.2,
                   ood_keep: float = 0.95) -> dict:
    """Choose both thresholds on validation, measure them on test and non-skin images, write ood_stats.pt and
    meta.json's "abstention" into the (calibrated) release."""
    model, ckpt = model_from_checkpoint(checkpoint)
    release = Path(release)
    meta = ReleaseMeta.load(release)
    if meta.split_hash != ckpt["split_hash"]:
        raise StudyError("the checkpoint and meta.json come from different splits")
    t = meta.temperature
    cfg = checkpoint_preprocessing(ckpt)
    data.use_threads()
    split = D.load_split(data)
    parts = {}
    for name in ("train", "val", "test"):
        recs = split.part(name)
        x = normalize(D.build_cache(recs, "eval", cfg, data.cache, f"decode {name}"), cfg.mean, cfg.std)
        parts[name] = (x, torch.tensor([r.label for r in recs]))
    feats, _, _, _ = _scores(model, parts["train"][0], t)
    stats = fit_class_gaussians(feats, parts["train"][1], len(D.CLASS_NAMES))
    _, _, val_top, val_dist = _scores(model, parts["val"][0], t, stats)
    uncertain_below = float(torch.quantile(val_top, uncertain_share))
    ood_above = float(torch.quantile(val_dist, ood_keep))
    _, test_logits, test_top, test_dist = _scores(model, parts["test"][0], t, stats)
    correct = (test_logits.argmax(1) == parts["test"][1])
    confident = test_top >= uncertain_below
    ood_sets, ood_report = non_skin_images(), {}
    all_ood = []
    for name, images in ood_sets.items():
        x = torch.stack([preprocess_bytes(b, cfg) for b in images])
        _, _, _, d = _scores(model, x, t, stats)
        all_ood.append(d)
        ood_report[name] = {"images": len(images), "rejected": float((d > ood_above).float().mean()),
                            "auroc": auroc(d.numpy(), test_dist.numpy())}
    all_ood = torch.cat(all_ood)
    result = {
        "uncertain_below": uncertain_below, "ood_distance_above": ood_above, "ood_method":
            "Mahalanobis distance of penultimate features (class means, shared covariance from the train split)",
        "test_lesions_rejected_as_ood": float((test_dist > ood_above).float().mean()),
        "test_ood_auroc_all": auroc(all_ood.numpy(), test_dist.numpy()),
        "non_skin_sets": ood_report,
        "test_uncertain_share": float((~confident).float().mean()),
        "test_accuracy_confident": float(correct[confident].float().mean()) if confident.any() else None,
        "test_accuracy_uncertain": float(correct[~confident].float().mean()) if (~confident).any() else None,
    }
    atomic_save({k: v.half() for k, v in stats.items()}, release / "ood_stats.pt")
    meta.abstention = {**result, "ood_stats_file": "ood_stats.pt"}
    meta.save(release)
    print(f"uncertain below p={uncertain_below:.3f} ({result['test_uncertain_share']:.0%} of test); OOD distance "
          f"> {ood_above:.2f}: AUROC {result['test_ood_auroc_all']:.3f}, real lesions rejected "
          f"{result['test_lesions_rejected_as_ood']:.1%}")
    return result


def main(args: argparse.Namespace) -> dict:
    return fit_abstention(args.checkpoint, Path(args.release), D.DataConfig.from_args(args), args.uncertain_share,
                          args.ood_keep)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
