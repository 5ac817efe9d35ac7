"""How a model is scored: logits over a uint8 image cache, and the classification metrics every report uses."""
from __future__ import annotations

import math

import torch

from skinmodel.preprocessing import normalize
from training.common.device import full_fp32


@torch.no_grad()
def predict_logits(model, images_uint8: torch.Tensor, mean, std, batch_size: int = 256, device=None) -> torch.Tensor:
    """fp32 logits (on the CPU) of a uint8 image cache, in batches on `device` (default: where the model is).
    Deterministic: the shared normalisation and nothing else, so on the CPU the inputs are bit for bit the
    handler's."""
    model.eval()
    if device is None:
        first = next(model.parameters(), None)  # an int8 network keeps its weights in packed params: CPU
        device = first.device if first is not None else torch.device("cpu")
    with full_fp32():
        outs = [model(normalize(images_uint8[i:i + batch_size].to(device, non_blocking=True), mean, std)).float().cpu()
                for i in range(0, len(images_uint8), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, 0)


def classification_metrics(y_true, y_pred, class_names) -> dict:
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, precision_score,
                                 recall_score, confusion_matrix)

    labels = list(range(len(class_names)))
    per_class_recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_precision": float(precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "macro_recall": float(recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class_recall": {c: float(v) for c, v in zip(class_names, per_class_recall)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
