"""The training recipe's pieces: the losses, class weights, the learning-rate schedule and the epoch count a
time budget allows (train.py reads them top to bottom; augmentation is training/network/augment.py)."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.network.augment import MIXES

CLASS_WEIGHTINGS = ("inverse", "sqrt", "none")


@dataclass(frozen=True)
class Recipe:
    """How every network of a study learns, beyond its architecture and schedule: one definition, shared by
    TrainConfig, StudyConfig, the grid, the recipe search and the accelerator run (flags: add_args)."""

    class_weighting: str = "inverse"  # inverse | sqrt | none: class_weights_from_counts
    label_smoothing: float = 0.0
    ema: float = 0.0                  # decay of an exponential moving average of the weights (0: off)
    mix: str = "none"                 # none | mixup | cutmix (training/network/augment.py)
    mix_alpha: float = 1.0            # Beta(alpha, alpha) of the share each image keeps

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Recipe":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        d = Recipe()
        r = p.add_argument_group("recipe")
        r.add_argument("--class-weighting", default=d.class_weighting, choices=CLASS_WEIGHTINGS,
                       help="loss weight per class: inverse frequency, its square root, or none")
        r.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
        r.add_argument("--ema", type=float, default=d.ema, help="EMA decay of the weights, e.g. 0.999 (0: off); "
                                                                "validation and checkpoints then use the average")
        r.add_argument("--mix", default=d.mix, choices=MIXES, help="mix each image with another of its batch")
        r.add_argument("--mix-alpha", type=float, default=d.mix_alpha, help="Beta(alpha, alpha) of the mix")


def weighted_ce(logits, targets, class_weights=None, label_smoothing: float = 0.0, partner=None, lam=None):
    """Mean over samples of w[y] * CE. Unlike cross_entropy(weight=...), which divides by the batch's sum of
    weights, this is a plain per-sample mean: the mean over ranks of each rank's loss is then exactly the loss of
    the global batch, so N processes train what one process would. With a mix (augment.mix), each sample's
    loss is lam * its own label's + (1 - lam) * its partner's."""
    def per_sample(y):
        ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
        return ce * class_weights[y] if class_weights is not None else ce

    if partner is None:
        return per_sample(targets).mean()
    return (lam * per_sample(targets) + (1 - lam) * per_sample(partner)).mean()


def kd_loss(student_logits, teacher_logits, targets, alpha: float, temperature: float, class_weights=None,
            label_smoothing: float = 0.0, partner=None, lam=None):
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    Returns (total, kd_term, ce_term). The T^2 factor keeps the soft-target gradients on the same
    scale as the hard-label ones when T changes (Hinton et al., 2015).
    """
    ce = weighted_ce(student_logits, targets, class_weights, label_smoothing, partner, lam)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kd = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    return alpha * kd + (1 - alpha) * ce, kd, ce


def class_weights_from_counts(counts, weighting: str = "inverse") -> torch.Tensor:
    """Per-class loss weights, normalised so that their mean over the training images is 1.
    inverse: 1/n (every class counts as much as any other); sqrt: 1/sqrt(n), a milder push towards the rare
    classes that costs `nv` less recall; none: all 1."""
    if weighting not in CLASS_WEIGHTINGS:
        raise ValueError(f"unknown class weighting {weighting!r}")
    counts = torch.as_tensor(counts, dtype=torch.float32).clamp_min(1)
    power = {"inverse": 1.0, "sqrt": 0.5, "none": 0.0}[weighting]
    w = counts.pow(-power)
    return w * counts.sum() / (w * counts).sum()


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 1 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epochs_for_budget(budget_s: float, elapsed_s: float, epoch_s: float, cap: int, done: int = 2) -> int:
    """How many epochs in all fit a time budget, given the time spent so far (the set-up and the `done` epochs
    run) and the measured length of one epoch (validation, checkpoints and plots included): at least one more
    than have run (the epochs so far followed a schedule planned for the cap: one more lets the learning rate
    come down to its floor, even past the budget), never more than the cap (--epochs). train.py measures the
    second epoch: the first pays for warm-up."""
    more = int(max(0.0, budget_s - elapsed_s) // max(epoch_s, 1e-9))
    return min(cap, done + max(1, more))
