"""PNG figures of a run: training history, confusion matrices, the distillation grid."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_history(csv_path: Path, png_path: Path) -> None:
    rows = list(csv.DictReader(open(csv_path)))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [float(r["train_loss"]) for r in rows], label="train loss")
    a.plot(epochs, [float(r["val_nll"]) for r in rows], label="val NLL")
    a.set_xlabel("epoch")
    a.legend()
    for key in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1"):
        b.plot(epochs, [float(r[key]) for r in rows], label=key.removeprefix("val_"))
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend()
    fig.suptitle(Path(csv_path).parent.name)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def plot_confusion(matrix, class_names, title: str, png_path: Path) -> None:
    cm = np.asarray(matrix, dtype=float)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row-normalised colour)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def plot_grid(alphas, temps, scores, png_path: Path, label="val macro-F1") -> None:
    grid = np.full((len(alphas), len(temps)), np.nan)
    for (a, t), s in scores.items():
        grid[alphas.index(a), temps.index(t)] = s
    fig, ax = plt.subplots(figsize=(1.2 * len(temps) + 2.5, 0.8 * len(alphas) + 2))
    im = ax.imshow(grid, cmap="viridis")
    for i in range(len(alphas)):
        for j in range(len(temps)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(temps)), [str(t) for t in temps])
    ax.set_yticks(range(len(alphas)), [str(a) for a in alphas])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("alpha")
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def plot_check_scores(groups: dict[str, np.ndarray], threshold: float, png_path: Path) -> None:
    """Where the dermoscopy check's scores fall: one histogram per group (real lesions first), the threshold as a
    line. What lies right of the line is answered `not_dermoscopy`."""
    low = min(float(np.percentile(v, 0.5)) for v in groups.values())
    high = max(float(np.percentile(v, 99.5)) for v in groups.values())
    bins = np.linspace(min(low, threshold) - 0.5, max(high, threshold) + 0.5, 70)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for name, scores in groups.items():
        share = float((scores > threshold).mean())
        ax.hist(np.clip(scores, bins[0], bins[-1]), bins=bins, density=True, histtype="step", linewidth=1.4,
                label=f"{name} (n={len(scores)}, refused {share:.1%})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax.text(threshold, ax.get_ylim()[1] * 0.97, " threshold", va="top", ha="left")
    ax.set_xlabel("dermoscopy-check score (logit of 'not dermoscopy'; each group's 0.5-99.5 % range shown)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
