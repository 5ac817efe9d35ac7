"""Subgroup tables: the figures computed by hand on a small made-up set, the bands, the flags and the intervals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.evaluation.labelled import Labelled
from training.common.metrics import wilson
from training.evaluation.subgroups import age_band, render_subgroups, subgroup_rows

pytestmark = pytest.mark.fast


def test_age_bands_and_bad_ages():
    assert [age_band(v) for v in ("5", "29.9", "30", "45.0", "69", "70", "85", "", "nan", "-3", "x")] == [
        "under 30", "under 30", "30-39", "40-49", "60-69", "70 and over", "70 and over", "unknown", "unknown",
        "unknown", "unknown"]


def test_rows_match_a_hand_count():
    # 40 women: classes 0 and 4 (mel = 4); 10 men. Refusals (-1) count as misses.
    sexes = ["female"] * 40 + ["male"] * 10
    y = np.array([0] * 20 + [4] * 20 + [4] * 10)
    pred = np.array([0] * 15 + [1] * 5 + [4] * 12 + [-1] * 8 + [4] * 10)
    verdicts = np.array(["ok"] * 32 + ["not_dermoscopy"] * 8 + ["uncertain"] * 10)
    items = [Labelled(Path(f"{i}.jpg"), int(k), {"sex": s, "age": "50"}) for i, (k, s) in enumerate(zip(y, sexes))]
    tables = subgroup_rows(items, y, pred, verdicts, mel=4)
    assert set(tables) == {"age band", "sex"}, "no body-site column: no body-site table"
    female, male = tables["sex"]
    assert female["group"] == "female" and female["images"] == 40 and female["readable"] and not male["readable"]
    assert female["balanced_accuracy"] == pytest.approx((15 / 20 + 12 / 20) / 2)
    assert female["mel_images"] == 20 and female["mel_recall"] == pytest.approx(0.6)
    assert female["mel_recall_ci95"] == pytest.approx(list(wilson(12, 20)))
    assert female["refused"] == pytest.approx(8 / 40) and female["refused_ci95"] == pytest.approx(list(wilson(8, 40)))
    lo, hi = female["balanced_accuracy_ci95"]
    assert lo < female["balanced_accuracy"] < hi and hi - lo < 0.5
    assert male["balanced_accuracy"] == 1.0 and male["classes_present"] == 1
    text = render_subgroups(tables)
    assert "| male (too small to read) | 10 | 1 |" in text and "Skin type is not recorded" in text
