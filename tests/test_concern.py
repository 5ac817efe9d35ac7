"""When an answer urges an examination: the served rule (skinmodel.answers.concern) and its threshold, chosen on
validation by training/release/concern.py."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from skinmodel.answers import concern, format_prediction
from skinmodel.release import ReleaseError, ReleaseMeta
from training.release.concern import SENSITIVITY, choose_rule, choose_served_threshold, choose_threshold, served
from training.release.model_card import _concern

from tests.conftest import REPO, run_training

RELEASES = ["release", "release/int8", "release/2.1", "release/2.1/int8", "release/1.3", "release/1.3/int8"]


def _meta(concern_rule: dict | None) -> ReleaseMeta:
    return dataclasses.replace(ReleaseMeta.load(REPO / "release"), concern=concern_rule)


def _ranked(meta: ReleaseMeta, probabilities: dict[str, float]) -> list[dict]:
    return sorted(({"code": c, "probability": probabilities.get(c, 0.0)} for c in meta.class_names),
                  key=lambda p: -p["probability"])


@pytest.mark.fast
@pytest.mark.parametrize("sensitivity", [0.9, 0.95, 0.98])
def test_the_threshold_is_the_highest_that_flags_the_share_asked_for(sensitivity):
    rng = np.random.default_rng(0)
    share, malignant = rng.random(1000), rng.random(1000) < 0.2
    t = choose_threshold(share, malignant, sensitivity)
    assert (share[malignant] >= t).mean() >= sensitivity  # the share asked for is flagged
    assert (share[malignant] >= np.nextafter(t, 1.0)).mean() < sensitivity  # any higher threshold flags fewer


@pytest.mark.fast
def test_the_served_flag_is_the_concerning_classes_together_against_the_threshold():
    probabilities = {"nv": 0.80, "mel": 0.10, "bcc": 0.05, "bkl": 0.05}
    at = _meta({"threshold": 0.15})
    answer = format_prediction([probabilities.get(c, 0.0) for c in at.class_names], at)
    assert answer["concern"] == {"flagged": True, "probability": pytest.approx(0.15), "classes": at.concerning}
    above = _meta({"threshold": 0.1501})
    assert not concern(_ranked(above, probabilities), above)["flagged"]
    refusing = dataclasses.replace(at, dermoscopy_check={"refuse_above": 0.0, "uncertain_below": 0.5})
    refused = format_prediction([probabilities.get(c, 0.0) for c in at.class_names], refusing, check_score=1.0)
    assert refused["verdict"] == "not_dermoscopy" and refused["concern"] is None  # nothing to urge about a non-lesion


@pytest.mark.fast
def test_without_a_threshold_the_former_rule_flags():
    """A release whose meta.json has no threshold is answered as the page answered before: a concerning class among
    the two most likely, or any at 25 % or more."""
    former = _meta(None)
    assert concern(_ranked(former, {"nv": 0.95, "mel": 0.02, "bkl": 0.01}), former)["flagged"]  # second, at 2 %
    assert not concern(_ranked(former, {"nv": 0.5, "bkl": 0.3, "mel": 0.1, "bcc": 0.1}), former)["flagged"]
    assert concern(_ranked(former, {"nv": 0.4, "bkl": 0.3, "mel": 0.26}), former)["flagged"]  # third, at 26 %


@pytest.mark.fast
@pytest.mark.parametrize("folder", RELEASES)
def test_every_committed_release_has_its_rule_chosen_on_validation_and_carded(folder):
    meta = ReleaseMeta.load(REPO / folder)
    rule = meta.concern
    assert rule["val"]["sensitivity"] >= rule["target_sensitivity"] == SENSITIVITY and rule["test"]["images"] > 1000
    adopted = rule["val"]["benign_flagged"] < rule["val_former_rule"]["benign_flagged"]
    assert (rule["threshold"] is not None) == adopted
    assert _concern(rule) in (REPO / folder / "model_card.md").read_text()  # the card says what is served


@pytest.mark.fast
def test_the_threshold_is_adopted_only_where_it_flags_fewer_benign_lesions_on_validation():
    meta = _meta(None)
    mel, nv, bkl = (meta.class_names.index(c) for c in ("mel", "nv", "bkl"))
    rows = np.zeros((6, 7))
    rows[:, [nv, mel, bkl]] = [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.6, 0.1, 0.3],  # malignant, second or third
                               [0.8, 0.15, 0.05], [0.9, 0.06, 0.04], [0.97, 0.02, 0.01]]  # benign, mel second
    labels = np.array([mel, mel, mel, nv, nv, nv])
    rule = choose_rule((rows, labels), (rows, labels), meta, 0.98)
    assert rule["threshold"] == pytest.approx(0.1) and rule["val"]["benign_flagged"] == pytest.approx(1 / 3)
    assert rule["val_former_rule"]["benign_flagged"] == 1.0  # mel second every time
    rows[3:, [nv, mel, bkl]] = [[0.5, 0.3, 0.2], [0.6, 0.35, 0.05], [0.55, 0.4, 0.05]]  # benign, more mel than above
    rule = choose_rule((rows, labels), (rows, labels), meta, 0.98)
    assert rule["threshold"] is None and rule["candidate_threshold"] == pytest.approx(0.1)  # the former rule stays


@pytest.mark.fast
@pytest.mark.parametrize("change, message", [({"concerning": ["mel", "melanoma"]}, "not among class_names"),
                                             ({"concern": {"threshold": "0.2"}}, "not a probability"),
                                             ({"concern": {"threshold": 1.5}}, "not a probability"),
                                             ({"concern": [0.2]}, "must be an object")])
def test_a_concern_rule_the_service_could_not_apply_is_refused_when_the_release_loads(change, message):
    d = {**json.loads((REPO / "release" / "meta.json").read_text()), **change}
    with pytest.raises(ReleaseError, match=message):
        ReleaseMeta.from_dict(d)


@pytest.mark.fast
def test_the_threshold_is_chosen_on_the_numbers_the_service_answers():
    """Shares that differ from the answered (rounded) ones in the last digits: a threshold chosen on the exact sums
    would leave the image at the threshold unflagged when served, and validation below its target."""
    meta = _meta(None)
    rng = np.random.default_rng(5)  # a seed whose boundary image rounds down when served
    probabilities = rng.dirichlet(np.ones(7) * 0.3, size=400).astype(np.float32)
    malignant = np.isin(rng.integers(0, 7, 400), [meta.class_names.index(c) for c in meta.concerning])
    t = choose_served_threshold(probabilities, malignant, meta, 0.98)
    _, flagged = served(probabilities, _meta({"threshold": t}))
    assert flagged[malignant].mean() >= 0.98


def test_the_concern_command_chooses_on_validation_and_refuses_another_split(tiny_release, data_dir, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(tiny_release, release)
    common = ["--release", str(release), "--data", str(data_dir), "--cache-dir", str(tmp_path / "cache")]
    r = run_training("concern", *common)  # the tiny release was trained on 8 images per class: another split
    assert r.returncode != 0 and "another split" in r.stderr and "Traceback" not in r.stderr
    r = run_training("concern", *common, "--limit-per-class", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    rule = json.loads((release / "meta.json").read_text())["concern"]
    assert rule["val"]["sensitivity"] >= SENSITIVITY and "concern: threshold" in r.stdout
    assert rule["test"]["concerning_images"] > 0 and set(rule["test_former_rule"]) == set(rule["test"])
