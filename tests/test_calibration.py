"""Temperature scaling lowers NLL on overconfident logits and ECE measures what it should."""
from __future__ import annotations

import pytest

import torch
import torch.nn.functional as F

from training.release.calibrate import expected_calibration_error, fit_temperature

pytestmark = pytest.mark.fast


def _overconfident(n=2000, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += 1.5  # informative...
    return logits * 4, labels  # ...but far too sharp


def test_temperature_scaling_lowers_validation_nll():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert t > 1.5, "overconfident logits need T > 1"
    assert F.cross_entropy(logits / t, labels) < F.cross_entropy(logits, labels) - 0.1
    # and it does not change a single prediction
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))


def test_ece_is_lower_after_scaling_and_zero_for_perfect_confidence():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    before, _ = expected_calibration_error(logits.softmax(1), labels)
    after, _ = expected_calibration_error((logits / t).softmax(1), labels)
    assert after < before / 2
    one_hot = F.one_hot(labels, 7).float()
    assert expected_calibration_error(one_hot, labels)[0] == 0.0
