"""The entry's rules on their own: what is routed, which headers pass, which bodies reach TorchServe."""
from __future__ import annotations

import base64
import io
import json

import pytest
from multidict import CIMultiDict
from PIL import Image

from stack import gate_policy as policy
from stress import bombs

CAP = 10 * 2**20


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (120, 80, 60)).save(buf, "JPEG")
    return buf.getvalue()


def _headers(*pairs) -> CIMultiDict:
    return CIMultiDict(pairs)


@pytest.mark.parametrize("method,path,want", [
    ("POST", "/predictions/skin-lesion", "api"), ("PUT", "/predictions/skin-lesion/1.0", "api"),
    ("POST", "/explanations/skin-lesion", "api"), ("GET", "/ping", "ping"), ("GET", "/", "static"),
    ("HEAD", "/app.js", "static"), ("GET", "/predictions/skin-lesion", 405), ("DELETE", "/predictions/x", 405),
    ("POST", "/models", 405), ("POST", "/ping", 405), ("PROPFIND", "/", 501),
    ("POST", "/predictions/../models", 405), ("POST", "/predictions/a/b/c", 405),
])
def test_routes(method, path, want):
    got = policy.route(method, path)
    assert (got.status if isinstance(got, policy.Refusal) else got) == want


@pytest.mark.parametrize("pairs,want", [
    ((("Content-Length", "123"),), 123),
    ((), 411),
    ((("Content-Length", "-1"),), 400),
    ((("Content-Length", "12abc"),), 400),
    ((("Content-Length", "１２"),), 400),  # full-width digits: str.isdigit() says yes, HTTP says no
    ((("Content-Length", "5"), ("Content-Length", "5")), 400),
    ((("Content-Length", "5"), ("Transfer-Encoding", "chunked")), 400),
    ((("Transfer-Encoding", "chunked"),), 400),
    ((("Content-Length", str(CAP + 1)),), 413),
    ((("Content-Length", str(CAP)),), CAP),
    ((("Content-Length", "10"), ("Content-Encoding", "gzip")), 415),
])
def test_header_checks(pairs, want):
    got = policy.check_headers(_headers(*pairs), CAP)
    assert (got.status if isinstance(got, policy.Refusal) else got) == want


def test_raw_image_bytes_are_forwarded_as_they_are():
    for kind in ("image/jpeg", "application/octet-stream", None, "image/png; charset=binary"):
        assert isinstance(policy.check_body(kind, _jpeg()), policy.Forward)


def test_a_form_field_bomb_is_refused_with_a_reason():
    got = policy.check_body("application/x-www-form-urlencoded", bombs.form_field_bomb(2**20))
    assert isinstance(got, policy.Refusal) and got.status == 415 and got.code == "unsupported_media_type"
    assert "application/x-www-form-urlencoded" in got.reason and "multipart" in got.reason


@pytest.mark.parametrize("kind", ["application/x-www-form-urlencoded", "text/plain", "application/xml"])
def test_image_bytes_under_a_wrong_content_type_are_recognised(kind):
    """curl --data-binary @lesion.jpg sends application/x-www-form-urlencoded."""
    got = policy.check_body(kind, _jpeg())
    assert got == policy.Forward("application/octet-stream")


def test_multipart_forms_of_at_most_two_parts():
    b = "XyZ"
    one = f'--{b}\r\nContent-Disposition: form-data; name="data"; filename="x.jpg"\r\n\r\n'.encode() + _jpeg()
    two = one + f'\r\n--{b}\r\nContent-Disposition: form-data; name="target"\r\n\r\nmel'.encode()
    three = two + f'\r\n--{b}\r\nContent-Disposition: form-data; name="x"\r\n\r\n1'.encode()
    close = f"\r\n--{b}--\r\n".encode()
    ct = f"multipart/form-data; boundary={b}"
    assert isinstance(policy.check_body(ct, one + close), policy.Forward)
    assert isinstance(policy.check_body(f'multipart/form-data; boundary="{b}"', two + close), policy.Forward)
    assert policy.check_body(ct, three + close).code == "too_many_parts"
    body, bomb_ct = bombs.multipart_part_bomb(parts=1000)
    assert policy.check_body(bomb_ct, body).code == "too_many_parts"
    assert policy.check_body("multipart/form-data", one + close).code == "malformed_multipart"
    assert policy.check_body("multipart/form-data; boundary=other", one + close).code == "malformed_multipart"
    assert policy.check_body(ct, one).code == "malformed_multipart"  # no closing delimiter


def test_json_must_be_a_flat_object_with_the_image():
    data = base64.b64encode(_jpeg()).decode()
    assert policy.check_body("application/json", json.dumps({"data": data}).encode()) == policy.Forward("application/json")
    assert isinstance(policy.check_body("application/json", json.dumps({"image": data, "target": "mel"}).encode()),
                      policy.Forward)
    for bad in (b"[" * 100_000 + b"]" * 100_000, b"not json", b"[]", b"{}", json.dumps({"target": "mel"}).encode(),
                json.dumps({"data": {"nested": data}}).encode(), json.dumps({"data": data, "extra": "x"}).encode(),
                json.dumps({"data": [data]}).encode()):
        got = policy.check_body("application/json", bad)
        assert isinstance(got, policy.Refusal) and (got.status, got.code) == (400, "bad_json"), bad[:40]
