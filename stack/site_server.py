"""The page's own origin: static files from site/dist plus a narrow proxy to TorchServe's inference API.

Only POST /predictions/..., POST /explanations/... and GET /ping are forwarded, so the browser never needs
TorchServe's ports and the management API is unreachable through it. Standard library only.
"""
from __future__ import annotations

import http.client
import json
import mimetypes
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

MAX_BODY = 10 * 2**20
FORWARD = re.compile(r"^/(predictions|explanations)/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


def multipart_problem(content_type: str, body: bytes) -> str | None:
    """TorchServe's frontend answers 500 to a multipart body that does not match its boundary; catch it here."""
    if not content_type.lower().startswith("multipart/"):
        return None
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return "multipart Content-Type without a boundary"
    boundary = match.group(1).encode()
    if not body.lstrip(b"\r\n").startswith(b"--" + boundary) or b"--" + boundary + b"--" not in body:
        return "the multipart body does not use the boundary its Content-Type declares"
    return None


def make_handler(dist: Path, upstream: str):
    target = urlsplit(upstream)
    root = dist.resolve()

    class Handler(BaseHTTPRequestHandler):
        server_version = "skin-site"
        sys_version = ""
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args):  # quiet: TorchServe and the audit log record predictions
            pass

        def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            for k, v in {**SECURITY_HEADERS, "Content-Type": content_type, "Content-Length": str(len(body)),
                         "Cache-Control": "no-store", **(extra or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, code: str, reason: str) -> None:
            self._send(status, json.dumps({"error": code, "reason": reason, "status": status}).encode(),
                       "application/json")

        def do_GET(self):  # noqa: N802 - http.server's naming
            path = urlsplit(self.path).path
            if path == "/ping":
                return self._forward(b"")
            rel = "index.html" if path in ("/", "") else path.lstrip("/")
            file = (root / rel).resolve()
            if root not in file.parents or not file.is_file():
                return self._json(404, "not_found", f"no such page: {path}")
            kind = "text/plain" if file.suffix == ".md" else (mimetypes.guess_type(file.name)[0]
                                                              or "application/octet-stream")
            self._send(200, file.read_bytes(), kind + ("; charset=utf-8" if kind.startswith("text/") or
                                                        kind.endswith("javascript") else ""))

        do_HEAD = do_GET

        def do_POST(self):  # noqa: N802
            path = urlsplit(self.path).path
            if not FORWARD.match(path):
                return self._json(404, "not_found", f"no such API path: {path}")
            length = self.headers.get("Content-Length")
            if length is None:
                return self._json(411, "length_required", "send the file with a Content-Length header")
            if int(length) > MAX_BODY:
                self.close_connection = True
                return self._json(413, "too_large", f"the upload is {int(length)} bytes; the limit is {MAX_BODY}")
            body = self.rfile.read(int(length))
            problem = multipart_problem(self.headers.get("Content-Type", ""), body)
            if problem:
                return self._json(400, "malformed_multipart", problem)
            self._forward(body)

        do_PUT = do_POST  # curl -T uploads with PUT; TorchServe accepts both

        def _forward(self, body: bytes) -> None:
            headers = {"Content-Type": self.headers.get("Content-Type", "application/octet-stream")}
            try:
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                conn.request(self.command, self.path, body=body if self.command in ("POST", "PUT") else None,
                             headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                kind = resp.getheader("Content-Type") or "application/json"
                conn.close()
            except OSError as exc:
                return self._json(502, "api_unavailable", f"the inference service is not reachable ({exc.__class__.__name__})")
            if resp.status == 500 and b"DecoderException" in data:
                # TorchServe's frontend could not parse the request (it says 500): it is the client's fault.
                return self._json(400, "malformed_request", "the request body does not match its Content-Type")
            if resp.status == 503:
                # TorchServe's own 503 text ("use scale workers API") misleads users: the queue is full.
                body = {"error": "busy", "status": 503, "retry_after_s": 2,
                        "reason": "the service is at capacity right now; retry in 2 seconds"}
                return self._send(503, json.dumps(body).encode(), "application/json", {"Retry-After": "2"})
            self._send(resp.status, data, kind)

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default listen backlog of 5 resets connections under a burst of clients
    daemon_threads = True


class SiteServer:
    def __init__(self, dist: Path, upstream: str, host: str = "127.0.0.1", port: int = 8000):
        self.httpd = _Server((host, port), make_handler(Path(dist), upstream))
        self.url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "SiteServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
