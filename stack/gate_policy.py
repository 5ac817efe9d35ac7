"""What the public entry lets through to TorchServe, as pure functions of a request's method, path, headers
and body: no sockets here, so every rule is tested on its own (tests/test_gate_policy.py) and the server
(stack/gate.py) only enforces it.

Why a body policy at all: TorchServe 0.12's Netty decodes url-encoded and multipart forms field by field
with no limit on the number of fields (CVE-2024-29025 class): a 10 MiB `a=&a=&...` body killed its JVM. So
only raw image bytes, JSON of the expected shape and multipart forms of at most two parts are forwarded.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from handler.formats import ACCEPTED_LABEL, JSON_IMAGE_KEYS, JSON_OPTION_KEYS, sniff

API_PATH = re.compile(r"^/(predictions|explanations)/[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
API_METHODS = ("POST", "PUT")  # PUT: curl -T uploads with it; TorchServe accepts both
MAX_MULTIPART_PARTS = 2
RAW_TYPES = ("application/octet-stream",)
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([0-9A-Za-z\'()+_,./:=?-]{1,70}))', re.I)


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    reason: str


@dataclass(frozen=True)
class Forward:
    content_type: str  # what TorchServe receives; raw image bytes always go as application/octet-stream


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def route(method: str, path: str) -> str | Refusal:
    """'api', 'ping' or 'static', or a refusal for a path/method the entry does not serve."""
    if API_PATH.match(path):
        if method not in API_METHODS:
            return Refusal(405, "method_not_allowed", f"{path} accepts POST or PUT with the image as the body")
        return "api"
    if path == "/ping":
        return "ping" if method in ("GET", "HEAD") else Refusal(405, "method_not_allowed", "/ping accepts GET")
    if method not in ("GET", "HEAD"):
        return Refusal(405 if method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS") else 501,
                       "method_not_allowed", f"{method} is not served here")
    return "static"


def check_headers(headers, max_body: int) -> Refusal | int:
    """The checks made before a single body byte is read; returns the body length if they pass."""
    if "Transfer-Encoding" in headers:
        return Refusal(400, "chunked_not_accepted", "send the file with a Content-Length header, not chunked")
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        return Refusal(415, "encoded_body", "compressed request bodies are not accepted; send the file as it is")
    lengths = headers.getall("Content-Length", []) if hasattr(headers, "getall") else [headers.get("Content-Length")]
    lengths = [v for v in lengths if v is not None]
    if not lengths:
        return Refusal(411, "length_required", "send the file with a Content-Length header")
    if len(lengths) > 1 or not lengths[0].isascii() or not lengths[0].isdigit():
        return Refusal(400, "bad_content_length", "Content-Length must appear once, as plain digits")
    length = int(lengths[0])
    if length > max_body:
        return Refusal(413, "too_large", f"the upload is {length} bytes; the limit is {max_body}")
    return length


def _multipart(content_type: str, body: bytes) -> Refusal | None:
    match = _BOUNDARY.search(content_type)
    if not match:
        return Refusal(400, "malformed_multipart", "multipart Content-Type without a valid boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode()
    if not body.lstrip(b"\r\n").startswith(delimiter) or delimiter + b"--" not in body:
        return Refusal(400, "malformed_multipart", "the multipart body does not use the boundary its Content-Type "
                                                   "declares")
    parts = body.count(b"\r\n" + delimiter) + (0 if body.startswith(b"\r\n") else 1) - 1
    if parts > MAX_MULTIPART_PARTS:
        return Refusal(400, "too_many_parts", f"the form has {parts} parts; send the image as its only field "
                                              f"(at most {MAX_MULTIPART_PARTS} parts)")
    return None


def _json(body: bytes) -> Refusal | None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return Refusal(400, "bad_json", "the body is not valid JSON")
    allowed = set(JSON_IMAGE_KEYS) | set(JSON_OPTION_KEYS)
    if not isinstance(doc, dict) or not doc or not set(doc) <= allowed \
            or not all(isinstance(v, str) for v in doc.values()) or not set(doc) & set(JSON_IMAGE_KEYS):
        return Refusal(400, "bad_json", 'JSON bodies must be an object like {"data": "<base64 image>"} '
                                        '(optionally with "target": "<class code>")')
    return None


def check_body(content_type: str | None, body: bytes) -> Forward | Refusal:
    """Decide what reaches TorchServe: raw image bytes, a checked JSON document or a small multipart form."""
    kind = media_type(content_type)
    if kind.startswith("image/") or kind in RAW_TYPES or not kind:
        return Forward(content_type or "application/octet-stream")
    if kind == "multipart/form-data":
        return _multipart(content_type, body) or Forward(content_type)
    if kind == "application/json":
        return _json(body) or Forward("application/json")
    if sniff(body):
        # curl --data-binary @lesion.jpg says application/x-www-form-urlencoded; the bytes say JPEG.
        return Forward("application/octet-stream")
    return Refusal(415, "unsupported_media_type",
                   f"{kind} bodies are not accepted: send the image file itself ({ACCEPTED_LABEL}) as "
                   "application/octet-stream or image/*, multipart form data with the image as its only field, "
                   'or JSON {"data": "<base64>"}')
