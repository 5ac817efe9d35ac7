"""The public entry: the page's static files and a policed proxy to TorchServe's inference API, in one
asyncio process (`python -m stack.gate`, started and restarted by `./skin up`).

Built on aiohttp's low-level server rather than http.server: one event loop holds thousands of slow
connections for a few KB each instead of a thread each; its llhttp parser refuses malformed, duplicate or
conflicting Content-Length/Transfer-Encoding before any code here runs; it sets TCP_NODELAY (keep-alive
clients paid 40 ms per request to Nagle + delayed ACK), closes idle and half-sent connections after the
keep-alive timeout, drains refused bodies before closing (so a client sees the 413 instead of a reset),
and keeps a pool of keep-alive connections to TorchServe.

What this module adds, in the order a request meets it (limits in GateLimits):
connection caps (in all, per address) -> route -> a per-client cap on requests in flight -> header checks
(stack/gate_policy.py) -> body read against a deadline and a byte budget shared by all connections -> body
policy -> TorchServe (with the inference key when token authorization is on) -> TorchServe's answer, or the
gate's own refusal in its place. Every answer, the parser's own error pages
included, is JSON or a static file with the security headers.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import mimetypes
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from stack import gate_policy as policy
from stack.tokens import TokenFile
from stack.settings import MODEL_NAME, Settings, torchserve_config, url

SECURITY_HEADERS = {
    "Server": "skin-gate",  # aiohttp would otherwise announce its and Python's versions
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}
log = logging.getLogger("gate")


@dataclass(frozen=True)
class GateLimits:
    max_body: int = int(torchserve_config("max_request_size"))  # TorchServe's own cap, in config.properties
    inflight_bytes: int = 64 * 2**20    # request bodies held at once, all connections together
    per_client: int = 4                 # API requests in flight per client address: at most half of what
                                        # 2 workers x batch 4 take at once (a page sends 1 at a time)
    max_connections: int = 512
    per_address_connections: int = 64   # open connections per client address (off behind a proxy)
    idle_s: float = 15.0                # keep-alive, and how long a client may take to send its headers
    body_s: float = 60.0                # to send the whole body (10 MiB needs >= 175 KB/s)
    upstream_s: float = 60.0
    retry_after_s: int = 2              # what a busy answer tells clients to wait
    restart_retry_after_s: int = 5      # ... and while TorchServe restarts or renews its keys


def _error_body(status: int, code: str, reason: str, retry_after: int | None) -> tuple[bytes, dict]:
    body = {"error": code, "reason": reason, "status": status}
    headers = {**SECURITY_HEADERS, "Content-Type": "application/json"}
    if retry_after is not None:
        body["retry_after_s"] = retry_after
        headers["Retry-After"] = str(retry_after)
    return json.dumps(body).encode(), headers


def refuse(r: policy.Refusal, retry_after: int | None = None, close: bool = False) -> web.Response:
    """A refusal as JSON with the security headers; close=True also ends the connection (after aiohttp has
    drained what the client was still sending, so the client reads this answer instead of a reset)."""
    body, headers = _error_body(r.status, r.code, r.reason, retry_after)
    resp = web.Response(status=r.status, body=body, headers=headers)
    if close:
        resp.force_close()
    return resp


class _Budget:
    """Bytes of request bodies held in memory by all connections together; taken as they arrive."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


# The parser's refusals: llhttp's fixed first line ("Duplicate Content-Length") is passed on, the rest of its
# message is not (it quotes the request, and this service never reflects what a client sent).
_PARSER_REASONS = {"LineTooLong": "the request line or a header is too long", "BadHttpMethod": "unknown HTTP method"}
_FIXED_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9 '-]{0,80}")


def _parser_reason(exc) -> str:
    if type(exc).__name__ in _PARSER_REASONS:
        return _PARSER_REASONS[type(exc).__name__]
    first = str(getattr(exc, "message", "") or "").strip().splitlines()[:1]
    text = first[0].rstrip(":") if first else ""
    return text if _FIXED_TEXT.fullmatch(text) else "the request is not valid HTTP/1.1"


class _Protocol(RequestHandler):
    def handle_error(self, request, status=500, exc=None, message=None):
        """The parser's own refusals (bad framing, oversize headers, unknown methods) and any unforeseen
        failure, as JSON with the headers; failures are logged, refusals are not (they are the clients')."""
        if status >= 500:
            log.error("unexpected failure answering a request", exc_info=exc)
            return refuse(policy.Refusal(500, "server_error", "internal error"), close=True)
        return refuse(policy.Refusal(status, "bad_request", _parser_reason(exc)), close=True)


class _Server(Server):
    """aiohttp's low-level server with two connection caps: in all, and per client address."""

    def __init__(self, handler, limits: GateLimits, per_address: bool, **kw):
        super().__init__(handler, **kw)
        self.limits, self.per_address = limits, per_address
        self.addresses: dict[str, int] = {}
        self.address_of: dict = {}

    def __call__(self):
        return _Protocol(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler, transport) -> None:
        super().connection_made(handler, transport)
        address = (transport.get_extra_info("peername") or ("?",))[0]
        self.address_of[handler] = address
        self.addresses[address] = self.addresses.get(address, 0) + 1
        if len(self._connections) > self.limits.max_connections:
            self._refuse(transport, "too many connections; retry shortly")
        elif self.per_address and self.addresses[address] > self.limits.per_address_connections:
            self._refuse(transport, "too many connections from this address; retry shortly")

    def connection_lost(self, handler, exc=None) -> None:
        address = self.address_of.pop(handler, None)
        if address is not None:
            self.addresses[address] -= 1
            if not self.addresses[address]:
                del self.addresses[address]
        super().connection_lost(handler, exc)

    def _refuse(self, transport, reason: str) -> None:
        """Before a request is even parsed: a complete 503 written straight to the socket, then close."""
        body, headers = _error_body(503, "busy", reason, self.limits.retry_after_s)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        transport.write(f"HTTP/1.1 503 Service Unavailable\r\n{head}Content-Length: {len(body)}\r\n"
                        f"Connection: close\r\n\r\n".encode() + body)
        transport.close()


PROTOCOLS = ("torchserve", "kserve-v1")


def to_kserve_v1(path: str, body: bytes | bytearray, content_type: str | None) -> tuple[str, bytes]:
    """/predictions/<m>[/<v>] + a body the policy accepted -> KServe's v1 call: /v1/models/<m>:predict (or
    :explain) with one instance: image bytes as {"data": "<base64>"}; a JSON body ({"data": ..., "target": ...},
    already base64) as it is. A version in the path is not part of v1: the InferenceService serves one."""
    kind, model = path.strip("/").split("/")[:2]
    verb = "explain" if kind == "explanations" else "predict"
    if content_type == "application/json":
        instance = body.decode() if isinstance(body, (bytes, bytearray)) else body
    else:
        instance = '{"data":"' + base64.b64encode(body).decode() + '"}'
    return f"/v1/models/{model}:{verb}", ('{"instances":[' + instance + "]}").encode()


def from_kserve_v1(status: int, data: bytes) -> tuple[int, bytes]:
    """{"predictions"|"explanations": [answer]} -> the answer, with the status the handler gave it (an error
    answer carries it: under KServe the handler leaves the HTTP status at 200, since the wrapper turns any other
    status into its own 500)."""
    try:
        doc = json.loads(data)
        answer = (doc["predictions"] if "predictions" in doc else doc["explanations"])[0]
    except (ValueError, RecursionError, KeyError, IndexError, TypeError):
        return status, data  # not an envelope: the entry's usual rules judge it
    if isinstance(answer, dict) and isinstance(answer.get("status"), int) and "error" in answer:
        status = answer["status"]
    return status, json.dumps(answer).encode()


class Gate:
    def __init__(self, dist: Path | None, upstream: str, tokens: TokenFile | None = None,
                 limits: GateLimits = GateLimits(), client_ip_header: str | None = None,
                 protocol: str = "torchserve"):
        self.upstream, self.tokens, self.limits = upstream.rstrip("/"), tokens, limits
        # torchserve: TorchServe's own REST API (./skin up, compose); kserve-v1: an InferenceService's v1 API
        # (deploy/kserve), whose TorchServe runtime hands our handler base64 instances.
        self.protocol = protocol
        # Behind nginx every connection comes from nginx: the client is the address it puts in this header.
        self.client_ip_header = client_ip_header
        self.files = self._load_static(Path(dist)) if dist else {}
        self.budget = _Budget(limits.inflight_bytes)
        self.per_client: dict[str, int] = {}
        self.session: ClientSession | None = None

    @staticmethod
    def _load_static(dist: Path) -> dict[str, tuple[bytes, str]]:
        """The page is a handful of small files: read once, so no request ever touches the file system."""
        files = {}
        for f in sorted(p for p in dist.rglob("*") if p.is_file()):
            kind = "text/plain" if f.suffix == ".md" else (mimetypes.guess_type(f.name)[0] or "application/octet-stream")
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            files["/" + f.relative_to(dist).as_posix()] = (f.read_bytes(), kind)
        if "/index.html" in files:
            files["/"] = files["/index.html"]
        return files

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        where = policy.route(request.method, request.path)
        if isinstance(where, policy.Refusal):
            resp = refuse(where)
            if where.status == 405:
                resp.headers["Allow"] = "POST, PUT" if policy.API_PATH.fullmatch(request.path) else "GET, HEAD"
            return resp
        if where == "static":
            found = self.files.get(request.path)
            if found is None:
                return refuse(policy.Refusal(404, "not_found", "no such page"))
            return web.Response(body=found[0], headers={**SECURITY_HEADERS, "Content-Type": found[1]})
        client = (request.headers.get(self.client_ip_header) if self.client_ip_header else None) or request.remote or "?"
        if self.per_client.get(client, 0) >= self.limits.per_client:
            return refuse(policy.Refusal(429, "too_many_requests", f"at most {self.limits.per_client} requests "
                                                                   "at a time per client; retry shortly"),
                          self.limits.retry_after_s)
        self.per_client[client] = self.per_client.get(client, 0) + 1
        try:
            if where == "ping":
                # KServe's wrapper has no /ping; its v1 readiness of the served model answers instead.
                ping = "/ping" if self.protocol == "torchserve" else f"/v1/models/{MODEL_NAME}"
                return await self._forward("GET", ping, b"", None)
            return await self._api(request)
        finally:
            self.per_client[client] -= 1
            if not self.per_client[client]:
                del self.per_client[client]

    async def _api(self, request: web.BaseRequest) -> web.StreamResponse:
        length = policy.check_headers(request.headers, self.limits.max_body)
        if isinstance(length, policy.Refusal):
            return refuse(length, close=True)
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # headers passed: send the body
        body, held = bytearray(), 0
        try:
            try:
                async with asyncio.timeout(self.limits.body_s):
                    while len(body) < length:
                        chunk = await request.content.read(min(2**16, length - len(body)))
                        if not chunk:
                            return refuse(policy.Refusal(400, "incomplete_body", "the connection ended before "
                                                                                 "Content-Length bytes arrived"))
                        if not self.budget.take(len(chunk)):
                            return refuse(policy.Refusal(503, "busy", "the service is receiving too many uploads "
                                                                      "right now; retry shortly"),
                                          self.limits.retry_after_s, close=True)
                        held += len(chunk)
                        body += chunk
            except TimeoutError:
                return refuse(policy.Refusal(408, "body_timeout", f"the upload took longer than "
                                                                  f"{self.limits.body_s:.0f} s"), close=True)
            decision = policy.check_body(request.headers.get("Content-Type"), body)
            if isinstance(decision, policy.Refusal):
                return refuse(decision)
            forwarded = decision.body if decision.body is not None else body
            if self.protocol == "kserve-v1":
                # The v1 request holds the body again, base64-encoded (4/3): that much more of the byte budget.
                extra = len(forwarded) * 3 // 2
                if not self.budget.take(extra):
                    return refuse(policy.Refusal(503, "busy", "the service is receiving too many uploads right "
                                                              "now; retry shortly"), self.limits.retry_after_s)
                held += extra
                path, payload = to_kserve_v1(request.path, forwarded, decision.content_type)
                return await self._forward("POST", path, payload, "application/json", unwrap=True)
            return await self._forward(request.method, request.path, forwarded, decision.content_type)
        finally:
            self.budget.give(held)

    async def _forward(self, method: str, path: str, body: bytes | bytearray, content_type: str | None,
                       retry_auth: bool = True, unwrap: bool = False) -> web.StreamResponse:
        headers = {"Content-Type": content_type} if content_type else {}
        if self.tokens is not None:
            headers.update(self.tokens.header("inference"))
        try:
            async with self.session.request(method, self.upstream + path, data=body if body else None,
                                            headers=headers) as resp:
                data = await resp.read()
                status, kind = resp.status, resp.headers.get("Content-Type", "application/json")
        except (ClientError, TimeoutError, OSError):
            return refuse(policy.Refusal(503, "unavailable", "the model server is not answering (it may be "
                                                             "restarting); retry shortly"),
                          self.limits.restart_retry_after_s)
        if status == 400 and b"InvalidKeyException" in data and self.tokens is not None and retry_auth:
            self.tokens.reload()  # the stack renewed the keys between our read and this request
            return await self._forward(method, path, body, content_type, retry_auth=False, unwrap=unwrap)
        if unwrap:
            status, data = from_kserve_v1(status, data)
            kind = "application/json"
        refusal = policy.upstream_refusal(status, data)
        if refusal is not None:
            retry = {503: self.limits.restart_retry_after_s if refusal.code == "unavailable"
                     else self.limits.retry_after_s, 507: 1}.get(refusal.status)
            return refuse(refusal, retry)
        return web.Response(status=status, body=data, headers={**SECURITY_HEADERS, "Content-Type": kind})

    async def start(self, host: str, port: int) -> web.BaseSite:
        self.session = ClientSession(
            connector=TCPConnector(limit=64, keepalive_timeout=30), cookie_jar=DummyCookieJar(),
            timeout=ClientTimeout(total=self.limits.upstream_s), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"))
        server = _Server(self.handle, self.limits, per_address=self.client_ip_header is None,
                         keepalive_timeout=self.limits.idle_s, lingering_time=5.0, auto_decompress=False,
                         access_log=None, max_headers=64, handler_cancellation=True)
        self.runner = web.ServerRunner(server, shutdown_timeout=10)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return site

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.session.close()


class GateThread:
    """The gate on its own event loop in a background thread (tests, benchmarks, stress runs)."""

    def __init__(self, dist: Path | None, upstream: str, tokens: TokenFile | None = None, host: str = "127.0.0.1",
                 port: int = 0, limits: GateLimits = GateLimits(), client_ip_header: str | None = None,
                 protocol: str = "torchserve"):
        self.gate = Gate(dist, upstream, tokens, limits, client_ip_header, protocol)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.host, self.port = host, port

    def start(self) -> "GateThread":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.gate.start(self.host, self.port), self.loop).result(30)
        self.url = url(self.gate.port, self.host)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gate.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stack.gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dist", help="the rendered page (site/build.py output); without it only the API is served "
                                   "(behind nginx, which serves the page itself)")
    p.add_argument("--upstream", required=True, help=f"TorchServe's inference URL, e.g. {Settings().inference_url}")
    p.add_argument("--key-file", help="TorchServe's key_file.json when token authorization is on")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=Settings.site_port)
    p.add_argument("--max-body", type=int, default=GateLimits.max_body)
    p.add_argument("--per-client", type=int, default=GateLimits.per_client,
                   help="API requests in flight per client address")
    p.add_argument("--protocol", choices=PROTOCOLS, default="torchserve",
                   help="the upstream's API: TorchServe's REST API, or a KServe InferenceService's v1 protocol")
    p.add_argument("--client-ip-header", help="take the client's address from this header (X-Real-IP behind "
                                              "nginx); only when nothing but that proxy can reach the gate")
    args = p.parse_args(argv)
    if args.dist and not Path(args.dist, "index.html").is_file():
        print(f"error: {args.dist}/index.html is missing (render the page with site/build.py)", file=sys.stderr)
        return 1
    tokens = TokenFile(Path(args.key_file)) if args.key_file else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gate %(levelname)s %(message)s")

    async def serve() -> None:
        gate = Gate(Path(args.dist) if args.dist else None, args.upstream, tokens,
                    GateLimits(max_body=args.max_body, per_client=args.per_client), args.client_ip_header,
                    args.protocol)
        await gate.start(args.host, args.port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print(f"gate listening on http://{args.host}:{gate.port} -> {args.upstream}", flush=True)
        await stop.wait()
        await gate.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
