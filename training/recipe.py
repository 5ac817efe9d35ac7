"""The training recipe's pieces: augmentation, the distillation loss, class weights and the learning-rate
schedule (train.py reads them top to bottom)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def kd_loss(student_logits, teacher_logits, targets, alpha: float, temperature: float, class_weights=None):
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    Returns (total, kd_term, ce_term). The T^2 factor keeps the soft-target gradients on the same
    scale as the hard-label ones when T changes (Hinton et al., 2015).
    """
    ce = F.cross_entropy(student_logits, targets, weight=class_weights)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kd = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    return alpha * kd + (1 - alpha) * ce, kd, ce


def class_weights_from_counts(counts) -> torch.Tensor:
    """Inverse-frequency weights, normalised so a uniformly distributed batch has mean weight 1."""
    counts = torch.as_tensor(counts, dtype=torch.float32).clamp_min(1)
    return counts.sum() / (len(counts) * counts)


def make_augment(crop_size: int):
    """Dermoscopy has no up or down: flips and any rotation are label-preserving."""
    return v2.Compose([
        v2.RandomResizedCrop(crop_size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(30),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02),
    ])


def augment_batch(images_uint8: torch.Tensor, augment) -> torch.Tensor:
    return torch.stack([augment(img) for img in images_uint8])


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 1 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
