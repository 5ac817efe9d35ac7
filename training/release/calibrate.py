"""Temperature scaling (Guo et al., 2017): one scalar T fitted on the validation split, stored in meta.json.

The handler divides logits by meta.json's temperature before the softmax, so served probabilities are the
calibrated ones. ECE and reliability diagrams are reported on the test split, before and after. Then the concern
threshold is chosen on the calibrated probabilities (training/release/concern.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skinmodel.release import ReleaseMeta
from training.common import data as D
from training.common.checkpoint import StudyError, checkpoint_preprocessing, model_from_checkpoint
from training.common.device import add_device_args, resolve_device
from training.common.metrics import predict_logits
from training.release.concern import fit_concern


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising NLL of softmax(logits / T): a coarse log-spaced scan, then a fine one around the best."""
    def nll(t):
        return F.cross_entropy(logits / t, labels).item()

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 200))
    best = min(grid, key=nll)
    fine = np.linspace(best * 0.9, best * 1.1, 101)
    return float(min(fine, key=nll))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> tuple[float, list]:
    """ECE over equal-width confidence bins; also returns (mean confidence, accuracy, count) per bin."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        n = int(mask.sum())
        if n:
            gap = abs(conf[mask].mean() - correct[mask].mean()).item()
            ece += gap * n / len(labels)
            table.append((conf[mask].mean().item(), correct[mask].mean().item(), n))
        else:
            table.append((None, None, 0))
    return ece, table


def plot_reliability(before: list, after: list, t: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, table, title in ((axes[0], before, "before (T = 1)"), (axes[1], after, f"after (T = {t:.2f})")):
        centers = [(i + 0.5) / len(table) for i in range(len(table))]
        accs = [a if a is not None else 0 for _, a, _ in table]
        ax.bar(centers, accs, width=1 / len(table), edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set_xlabel("confidence of the top class")
        ax.set_title(title)
        ax.legend(loc="upper left")
    axes[0].set_ylabel("accuracy (test split)")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fit a temperature on validation, report test ECE, update meta.json.",
                                add_help=add_help)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--release", required=True, help="folder with the meta.json to update (and for the PNG)")
    D.add_data_args(p, sizes=False)
    add_device_args(p)
    return p


def calibrate(checkpoint: str, release: Path, data: D.DataConfig, device: str = "auto") -> dict:
    """Fit T on validation, measure test ECE before and after, store T in the release's meta.json."""
    model, ckpt = model_from_checkpoint(checkpoint)
    model.to(resolve_device(device))
    release = Path(release)
    meta = ReleaseMeta.load(release)
    if meta.split_hash != ckpt["split_hash"]:
        raise StudyError("the checkpoint and meta.json come from different splits")
    data.use_threads()
    split = D.load_split(data)
    cfg = checkpoint_preprocessing(ckpt)
    out = {}
    for name in ("val", "test"):
        part = split.part(name)
        x = D.build_cache(part, "eval", cfg, data.cache, f"decode {name}")
        out[name] = (predict_logits(model, x, cfg.mean, cfg.std), torch.tensor([r.label for r in part]))
    t = fit_temperature(*out["val"])
    logits, labels = out["test"]
    ece_before, table_before = expected_calibration_error(logits.softmax(1), labels)
    ece_after, table_after = expected_calibration_error((logits / t).softmax(1), labels)
    plot_reliability(table_before, table_after, t, release / "reliability.png")
    result = {"method": "temperature scaling on the validation split", "temperature": t,
              "val_nll_before": F.cross_entropy(out["val"][0], out["val"][1]).item(),
              "val_nll_after": F.cross_entropy(out["val"][0] / t, out["val"][1]).item(),
              "test_nll_before": F.cross_entropy(logits, labels).item(),
              "test_nll_after": F.cross_entropy(logits / t, labels).item(),
              "test_ece_before": ece_before, "test_ece_after": ece_after, "ece_bins": 15}
    meta.temperature, meta.calibration = t, result
    meta_path = meta.save(release)
    print(f"T = {t:.3f}: test ECE {ece_before:.4f} -> {ece_after:.4f}, test NLL {result['test_nll_before']:.3f} -> "
          f"{result['test_nll_after']:.3f}; wrote {meta_path} and {release / 'reliability.png'}")
    fit_concern(release, data)  # the threshold on calibrated probabilities, so after T
    return result


def main(args: argparse.Namespace) -> dict:
    return calibrate(args.checkpoint, Path(args.release), D.DataConfig.from_args(args), args.device)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
