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

pytestmark = pytest.mark.fast

CAP = 10 * 2**20


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (120, 80, 60)).save(buf, "JPEG")
    return buf.getvalue()


def _headers(*pairs) -> CIMultiDict:
    return CIMultiDict(pairs)


@pytest.mark.parametrize("method,path,want", [
    ("POST", "/predictions/skin-lesion", "api"), ("PUT", "/predictions/skin-lesion/1.0", 404),
    ("POST", "/explanations/skin-lesion", "api"), ("GET", "/ping", "ping"), ("GET", "/", "static"),
    ("HEAD", "/app.js", "static"), ("GET", "/predictions/skin-lesion", 405), ("DELETE", "/predictions/x", 405),
    ("POST", "/models", 405), ("POST", "/ping", 405), ("PROPFIND", "/", 405),
    ("POST", "/predictions/../models", 405), ("POST", "/predictions/a/b/c", 405),
])
def test_routes(method, path, want):
    got = policy.route(method, path)
    assert (got.status if isinstance(got, policy.Refusal) else got) == want


def test_model_versions_are_the_owners():
    """At the public entry no client picks a registered version (a canary); the owner's entry may."""
    got = policy.route("POST", "/predictions/skin-lesion/2.0-canary")
    assert isinstance(got, policy.Refusal) and got.status == 404 and "2.0" not in got.reason
    assert policy.route("POST", "/predictions/skin-lesion/2.0-canary", versions=True) == "api"


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


def test_raw_image_bytes_are_forwarded_as_octet_stream():
    for kind in ("image/jpeg", "application/octet-stream", None, "image/png; charset=binary"):
        assert policy.check_body(kind, _jpeg()) == policy.Forward("application/octet-stream")


def test_a_form_field_bomb_is_refused_with_a_reason():
    got = policy.check_body("application/x-www-form-urlencoded", bombs.form_field_bomb(2**20))
    assert isinstance(got, policy.Refusal) and got.status == 415 and got.code == "unsupported_media_type"
    assert "application/x-www-form-urlencoded" in got.reason and "multipart" in got.reason


@pytest.mark.parametrize("kind", ["application/x-www-form-urlencoded", "text/plain", "application/xml"])
def test_image_bytes_under_a_wrong_content_type_are_recognised(kind):
    """curl --data-binary @lesion.jpg sends application/x-www-form-urlencoded."""
    got = policy.check_body(kind, _jpeg())
    assert got == policy.Forward("application/octet-stream")


def _form(boundary: str, *parts: bytes, newline: bytes = b"\r\n") -> bytes:
    out = b""
    for part in parts:
        out += b"--" + boundary.encode() + newline + part + newline
    return out + b"--" + boundary.encode() + b"--" + newline


def _field(name: str, value: bytes, filename: str | None = None, kind: str | None = None) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (disposition + (f"\r\nContent-Type: {kind}" if kind else "") + "\r\n\r\n").encode() + value


def test_a_multipart_form_is_parsed_here_and_only_its_image_goes_on():
    """TorchServe never sees a form: the image field goes on as raw bytes."""
    jpeg, b = _jpeg(), "XyZ"
    ct = f"multipart/form-data; boundary={b}"
    for body in (_form(b, _field("data", jpeg, "x.jpg", "image/jpeg")), _form(b, _field("file", jpeg)),
                 _form(b, _field("target", b"mel"), _field("upload", jpeg, "lesion.jpg"))):
        assert policy.check_body(ct, body) == policy.Forward("application/octet-stream", jpeg)
    assert policy.check_body(f'multipart/form-data; boundary="{b}"', _form(b, _field("data", jpeg))).body == jpeg
    assert policy.check_body(ct, _form(b, _field("target", b"mel"))).code == "no_image_field"


@pytest.mark.parametrize("name,content_type,body,code", [
    ("three parts", "multipart/form-data; boundary=B",
     _form("B", _field("data", b"x"), _field("a", b"1"), _field("b", b"2")), "too_many_parts"),
    ("a part bomb", bombs.multipart_part_bomb(parts=1000)[1], bombs.multipart_part_bomb(parts=1000)[0], "too_many_parts"),
    ("no boundary", "multipart/form-data", _form("B", _field("data", b"x")), "malformed_multipart"),
    ("another boundary", "multipart/form-data; boundary=other", _form("B", _field("data", b"x")), "malformed_multipart"),
    # Netty takes the first parameter that starts with "boundary": the gate must not read another one.
    ("a second boundary-like parameter", "multipart/form-data; xboundary=A; boundary=B",
     _form("B", _field("data", b"x")), None),
    ("boundary twice", "multipart/form-data; boundary=A; boundary=B", _form("B", _field("data", b"x")),
     "malformed_multipart"),
    ("bare LF delimiters", "multipart/form-data; boundary=B",
     b"--B\r\n" + _field("data", b"x") + b"\n--B\n" + _field("a", b"1") + b"\n--B\n" + _field("b", b"2") + b"\r\n--B--\r\n",
     "malformed_multipart"),
    ("nested multipart", "multipart/form-data; boundary=B",
     _form("B", _field("data", _form("C", *[_field("f", b"1")] * 50), kind="multipart/mixed; boundary=C")),
     "malformed_multipart"),
    ("no closing boundary", "multipart/form-data; boundary=B", b"--B\r\n" + _field("data", b"x") + b"\r\n",
     "malformed_multipart"),
    ("non-ASCII boundary", "multipart/form-data; boundary=\udcc3\udca9", b"--\xc3\xa9\r\n", "malformed_multipart"),
])
def test_multipart_forms_that_another_parser_could_read_differently_are_refused(name, content_type, body, code):
    got = policy.check_body(content_type, body)
    if code is None:
        assert got == policy.Forward("application/octet-stream", b"x"), name
    else:
        assert isinstance(got, policy.Refusal) and got.code == code, (name, got)


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


def test_json_is_judged_by_its_shape_before_it_is_parsed(monkeypatch):
    """A 10 MiB object of 870 k keys (half a second of json.loads on the gate's one event loop), UTF-16 (passes
    json.loads, then fails the KServe v1 encoding) and nesting are refused without json.loads ever running."""
    parsed = []
    real_loads = policy.json.loads
    monkeypatch.setattr(policy.json, "loads", lambda b, *a, **k: parsed.append(len(b)) or real_loads(b, *a, **k))
    data = base64.b64encode(_jpeg()).decode()
    key_bomb = ("{" + ",".join(f'"k{i}":"1"' for i in range(870_000)) + "}").encode()
    for bad in (key_bomb, json.dumps({"data": data}).encode("utf-16"), json.dumps({"data": {"a": data}}).encode(),
                b'{"data": "' + data.encode() + b'", "target": "mel", "target": "akiec", "target": "nv", '
                b'"target": "bcc", "target": "df", "target": "vasc"}'):
        got = policy.check_body("application/json", bad)
        assert isinstance(got, policy.Refusal) and got.code == "bad_json", bad[:40]
    assert parsed == []
    for good in ({"data": data}, {"target": "mel", "data": data}, {"data": base64.encodebytes(_jpeg()).decode()}):
        assert policy.check_body("application/json", json.dumps(good).encode()) == policy.Forward("application/json")
    assert len(parsed) == 3


def test_a_part_bomb_is_counted_not_split():
    """10 MiB of delimiters is refused by counting them, before the form is split into a million parts (which
    would have found it unclosed)."""
    boundary = "b"
    body = b"--b\r\n" + b"\r\n--b\r\n" * 1_000_000
    got = policy.check_body(f"multipart/form-data; boundary={boundary}", body)
    assert isinstance(got, policy.Refusal) and got.code == "too_many_parts"


@pytest.mark.parametrize("status,body,want", [
    (200, b'{"top": {}}', None),
    (415, b'{"error": "not_an_image", "reason": "...", "status": 415}', None),  # the handler's own refusal
    (404, b'{"code": 404, "type": "ModelNotFoundException", "message": "Model not found: <script>"}', (404, "model_not_found")),
    (503, b'{"code": 503, "type": "ServiceUnavailableException", "message": "use scale workers API"}', (503, "busy")),
    (507, b'{"code": 507, "type": "InternalServerException", "message": "Worker died."}', (507, "worker_died")),
    (400, b'{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed"}', (503, "unavailable")),
    (500, b'{"code": 500, "type": "DecoderException", "message": "..."}', (400, "malformed_request")),
    (500, b'{"code": 500, "type": "InternalServerException", "message": "Worker died."}', (507, "worker_died")),
    (507, b'{"code": 507, "type": "InternalServerException", "message": "Worker died."}', (507, "worker_died")),
    (500, b'{"code": 500, "type": "InternalServerException", "message": "Worker died, twice."}', (500, "upstream_error")),
    (503, b'{"code": 503, "type": "ServiceUnavailableException", "message": "audit trail unavailable: No space"}',
     (503, "audit_unavailable")),
    (413, b"", (413, "too_large")),
    (502, b"<html>bad gateway</html>", (502, "upstream_error")),
])
def test_torchserve_answers_are_passed_on_only_when_they_are_the_handlers(status, body, want):
    got = policy.upstream_refusal(status, body)
    assert (got if got is None else (got.status, got.code)) == want
    if got is not None:
        assert "<script>" not in got.reason and "scale workers" not in got.reason
