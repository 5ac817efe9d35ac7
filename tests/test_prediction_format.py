"""Payload extraction and the response JSON, without a server."""
from __future__ import annotations

import base64
import dataclasses

import pytest

from skinmodel.answers import NOTICE, format_error, format_prediction
from skinmodel.payload import extract_image_bytes
from skinmodel.preprocessing import InputError, PreprocessConfig
from skinmodel.release import ReleaseMeta

pytestmark = pytest.mark.fast

META = ReleaseMeta("m", "9", "resnet18", ["a", "b", "c"], ["A", "B", "C"], ["", "", ""],
                   PreprocessConfig(32, 32, (0.5,) * 3, (0.2,) * 3))


@pytest.mark.parametrize("row", [
    {"body": b"abc"}, {"data": b"abc"}, {"file": bytearray(b"abc")},
    {"body": {"data": base64.b64encode(b"abc").decode()}},
    {"body": {"image": "data:image/png;base64," + base64.b64encode(b"abc").decode()}},
])
def test_payload_shapes(row):
    assert extract_image_bytes(row) == b"abc"


@pytest.mark.parametrize("row,code", [
    ({"body": {"data": "not base64!"}}, "bad_base64"),
    ({"body": {"something": 1}}, "bad_json"),
    ({"body": "plain text"}, "not_an_image"),
    ({"body": None}, "empty_body"),
])
def test_bad_payloads(row, code):
    with pytest.raises(InputError) as err:
        extract_image_bytes(row)
    assert err.value.code == code


def test_prediction_lists_every_class_sorted():
    out = format_prediction([0.2, 0.5, 0.3], META, "rid")
    assert [p["code"] for p in out["predictions"]] == ["b", "c", "a"]
    assert out["top"] == {"code": "b", "name": "B", "probability": 0.5}
    assert out["model"] == {"name": "m", "version": "9"} and out["notice"] == NOTICE and out["request_id"] == "rid"


def test_error_body():
    body = format_error(InputError(415, "not_an_image", "nope"), "x")
    assert body == {"error": "not_an_image", "reason": "nope", "status": 415, "request_id": "x"}


def test_verdicts_follow_the_thresholds_in_meta():
    meta = dataclasses.replace(META, dermoscopy_check={"uncertain_below": 0.45, "refuse_above": 10.0})
    assert format_prediction([0.2, 0.5, 0.3], meta, check_score=3.0)["verdict"] == "ok"
    assert format_prediction([0.3, 0.4, 0.3], meta, check_score=3.0)["verdict"] == "uncertain"
    far = format_prediction([0.1, 0.8, 0.1], meta, check_score=12.0)
    assert far["verdict"] == "not_dermoscopy" and far["top"] is None and len(far["predictions"]) == 3
    assert format_prediction([0.3, 0.4, 0.3], META)["verdict"] == "ok"  # no thresholds: no dermoscopy check


def test_a_release_1_0_threshold_key_still_refuses():
    """1.0's meta.json named the threshold ood_distance_above (formerly, in its "abstention" block); read through
    ReleaseMeta, such a release must keep refusing."""
    old = {**META.to_dict(), "schema": 1, "abstention": {"uncertain_below": 0.45, "ood_distance_above": 10.0}}
    meta = ReleaseMeta.from_dict(old)
    assert meta.dermoscopy_check == {"uncertain_below": 0.45, "refuse_above": 10.0}
    assert format_prediction([0.1, 0.8, 0.1], meta, check_score=12.0)["verdict"] == "not_dermoscopy"
    assert format_prediction([0.1, 0.8, 0.1], meta, check_score=8.0)["verdict"] == "ok"
