"""What the public entry lets through to TorchServe, as pure functions of a request's method, path, headers
and body: no sockets here, so every rule is tested on its own (tests/test_gate_policy.py) and the server
(stack/gate.py) only enforces it.

Why a body policy at all: TorchServe 0.12's Netty decodes url-encoded and multipart forms field by field
with no limit on the number of fields (CVE-2024-29025 class): a 10 MiB `a=&a=&...` body killed its JVM. So
TorchServe is only ever sent raw image bytes or a JSON document of the expected shape: a multipart form is
parsed here, strictly (one boundary parameter, CRLF delimiters only, at most two parts, none nested), and
only its image field is forwarded, as raw bytes.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from skinmodel.audit import AUDIT_UNAVAILABLE
from skinmodel.formats import ACCEPTED_LABEL, JSON_IMAGE_KEYS, JSON_OPTION_KEYS, sniff

API_PATH = re.compile(r"/(predictions|explanations)/[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
API_METHODS = ("POST", "PUT")  # PUT: curl -T uploads with it; TorchServe accepts both
MAX_MULTIPART_PARTS = 2
RAW = "application/octet-stream"
IMAGE_FIELDS = ("data", "file")
# RFC 2046 boundary characters; ASCII only (header values arrive as str, non-ASCII bytes surrogate-escaped).
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    reason: str


@dataclass(frozen=True)
class Forward:
    content_type: str            # what TorchServe receives: application/octet-stream or application/json
    body: bytes | None = None    # what it receives instead of the request body (a multipart form's image)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def route(method: str, path: str, versions: bool = False) -> str | Refusal:
    """'api', 'ping' or 'static', or a refusal for a path/method the entry does not serve. A model version in
    the path (/predictions/<model>/<version>) only where `versions` is on: the owner's private entry."""
    if m := API_PATH.fullmatch(path):
        if m.group(2) and not versions:
            return Refusal(404, "not_found", "model versions are not selectable here; "
                                             "use /predictions/<model> or /explanations/<model>")
        if method not in API_METHODS:
            return Refusal(405, "method_not_allowed", f"{path} accepts POST or PUT with the image as the body")
        return "api"
    if path == "/ping":
        return "ping" if method in ("GET", "HEAD") else Refusal(405, "method_not_allowed", "/ping accepts GET")
    if method not in ("GET", "HEAD"):
        return Refusal(405, "method_not_allowed", "the page accepts GET and HEAD")
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


def _params(content_type: str) -> dict[str, str] | None:
    """The Content-Type's parameters, strictly: name=value pairs, each name once; None if malformed."""
    out: dict[str, str] = {}
    for item in content_type.split(";")[1:]:
        name, sep, value = item.strip().partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or not name or name in out:
            return None
        out[name] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return out


def _bad_form(reason: str) -> Refusal:
    return Refusal(400, "malformed_multipart", reason)


def _multipart_image(content_type: str, body: bytes) -> bytes | Refusal:
    """The image field of a multipart form, parsed strictly enough that no other parser can read more parts
    into it: TorchServe's Netty also splits on a bare LF, takes any parameter starting with "boundary" and
    expands nested multipart/mixed parts."""
    params = _params(content_type)
    boundary = (params or {}).get("boundary", "")
    if params is None or not _BOUNDARY.fullmatch(boundary):
        return _bad_form("the multipart Content-Type needs exactly one valid boundary parameter")
    delim = b"--" + boundary.encode("ascii")
    if not body.startswith(delim + b"\r\n"):
        return _bad_form("the multipart body does not start with the boundary its Content-Type declares")
    delimiters = body.count(b"\r\n" + delim)
    if body.count(b"\n" + delim) != delimiters:
        return _bad_form("multipart delimiters must end lines with CRLF")
    if delimiters > MAX_MULTIPART_PARTS:  # counted before anything is split: a part bomb costs one scan
        return Refusal(400, "too_many_parts", f"the form has {delimiters} parts; send the image as its only field "
                                              f"(at most {MAX_MULTIPART_PARTS} parts)")
    pieces = body[len(delim) + 2:].split(b"\r\n" + delim)
    if len(pieces) < 2 or not pieces[-1].startswith(b"--"):
        return _bad_form("the multipart body has no closing boundary")
    parts = pieces[:1] + [p[2:] for p in pieces[1:-1] if p.startswith(b"\r\n")]
    if len(parts) != len(pieces) - 1:
        return _bad_form("a multipart delimiter is followed by something other than a line break")
    if len(parts) > MAX_MULTIPART_PARTS:
        return Refusal(400, "too_many_parts", f"the form has {len(parts)} parts; send the image as its only field "
                                              f"(at most {MAX_MULTIPART_PARTS} parts)")
    for part in parts:
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            return _bad_form("a multipart part has no header block")
        headers = {}
        for line in head.split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("content-type", "").lower().startswith("multipart/"):
            return _bad_form("nested multipart parts are not accepted")
        disposition = _params("form-data;" + headers.get("content-disposition", "").partition(";")[2]) or {}
        if disposition.get("name") in IMAGE_FIELDS or "filename" in disposition:
            return content
    return Refusal(400, "no_image_field", f"the form has no image field (name it {' or '.join(IMAGE_FIELDS)})")


# The only JSON documents accepted: a flat object of a few short keys with string values (base64 and class
# codes: no quote inside). Checked by this regular expression, linear in the body and without nesting,
# BEFORE json.loads: a 10 MiB object of 870 k keys never reaches the parser (which would hold the event loop
# for half a second); what passes costs json.loads a few keys and one long string.
_MEMBER = rb'\s*"[a-z_0-9]{1,16}"\s*:\s*"[A-Za-z0-9+/=_.\s\\-]*"\s*'
_JSON_SHAPE = re.compile(rb'\s*\{' + _MEMBER + rb'(?:,' + _MEMBER + rb'){0,%d}\}\s*'
                         % (len(JSON_IMAGE_KEYS) + len(JSON_OPTION_KEYS) - 1))


def _json(body: bytes) -> Refusal | None:
    shape = Refusal(400, "bad_json", 'JSON bodies must be an object like {"data": "<base64 image>"} '
                                     '(optionally with "target": "<class code>")')
    if not _JSON_SHAPE.fullmatch(body):
        # ASCII only, so strictly UTF-8 too (json.loads would also take UTF-16/32, which v1 cannot forward)
        return shape
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return Refusal(400, "bad_json", "the body is not valid JSON")
    allowed = set(JSON_IMAGE_KEYS) | set(JSON_OPTION_KEYS)
    if not isinstance(doc, dict) or not doc or not set(doc) <= allowed \
            or not all(isinstance(v, str) for v in doc.values()) or not set(doc) & set(JSON_IMAGE_KEYS):
        return shape
    return None


def check_body(content_type: str | None, body: bytes) -> Forward | Refusal:
    """Decide what reaches TorchServe: raw image bytes (from the body or a form's image field) or a checked
    JSON document."""
    kind = media_type(content_type)
    if kind.startswith("image/") or kind == RAW or not kind:
        return Forward(RAW)
    if kind == "multipart/form-data":
        image = _multipart_image(content_type or "", body)
        return image if isinstance(image, Refusal) else Forward(RAW, image)
    if kind == "application/json":
        return _json(body) or Forward("application/json")
    if sniff(body):
        # curl --data-binary @lesion.jpg says application/x-www-form-urlencoded; the bytes say JPEG.
        return Forward(RAW)
    return Refusal(415, "unsupported_media_type",
                   f"{kind} bodies are not accepted: send the image file itself ({ACCEPTED_LABEL}) as "
                   "application/octet-stream or image/*, multipart form data with the image as its only field, "
                   'or JSON {"data": "<base64>"}')


def upstream_refusal(status: int, body: bytes) -> Refusal | None:
    """What a TorchServe answer becomes at the entry: None to pass it on (a prediction, or the handler's own
    JSON refusal), else the entry's own refusal. TorchServe's frontend errors ({"code", "type", "message"})
    are never passed on: they quote the request (a model name from the path) and some mislead (its 503 says
    to add workers)."""
    if status < 400:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and "error" in doc and "reason" in doc:
        return None  # the handler's refusal of this image
    kind = doc.get("type", "") if isinstance(doc, dict) else ""
    if status == 400 and kind == "InvalidKeyException":
        return Refusal(503, "unavailable", "the model server is renewing its keys or restarting; retry shortly")
    if status == 500 and "DecoderException" in kind + str(body[:2000]):
        return Refusal(400, "malformed_request", "the request body does not match its Content-Type")
    if isinstance(doc, dict) and str(doc.get("message", "")).startswith(AUDIT_UNAVAILABLE):
        # The handler could not write the audit events of this batch, so it gave no answers (skinmodel/audit.py).
        return Refusal(503, "audit_unavailable", "the service cannot record its answers right now, so it gives "
                                                 "none; retry shortly")
    if isinstance(doc, dict) and doc.get("message") == "Worker died.":
        # TorchServe answers a killed worker's requests 507 when it has read the exit code (137) in time, else
        # 500 with the same message: one retryable answer either way.
        status = 507
    return {
        404: Refusal(404, "model_not_found", "no such model or model version"),
        413: Refusal(413, "too_large", "the upload is larger than the model server accepts"),
        503: Refusal(503, "busy", "the service is at capacity right now; retry shortly"),
        507: Refusal(507, "worker_died", "the worker handling this request stopped; retry shortly"),
    }.get(status, Refusal(status if status < 600 else 502, "upstream_error", f"the model server answered HTTP {status}"))
