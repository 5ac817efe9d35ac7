"""The public entry: the page's static files and a policed proxy to TorchServe's inference API, in one
asyncio process (`python -m stack.gate`, started and restarted by `./skin up`).

Built on aiohttp's low-level server rather than http.server: one event loop holds thousands of slow
connections for a few KB each instead of a thread each; its llhttp parser refuses malformed, duplicate or
conflicting Content-Length/Transfer-Encoding before any code here runs; it sets TCP_NODELAY (keep-alive
clients paid 40 ms per request to Nagle + delayed ACK), closes idle and half-sent connections after the
keep-alive timeout, and keeps a pool of keep-alive connections to TorchServe. Refused bodies are drained
here, not by aiohttp's lingering close: at a bounded rate for all refusals together, so a client reads its
refusal instead of a reset and a flood of refused uploads costs the machine at most that many bytes a second.

What this module adds, in the order a request meets it (limits in GateLimits; the transport and connection
shares in stack/gate_server.py, the bookkeeping of shares in stack/fairness.py):
connection caps (in all, per client, per network; silent connections reclaimed first) -> route (model
versions are the owner's) -> a per-client request rate (429 + Retry-After) and cap on requests in flight ->
header checks (stack/gate_policy.py) -> the declared body length reserved from the byte budget (client,
network, all) -> only then `100 Continue` -> body read against a deadline, a stall limit and a minimum
rate -> body policy (shape checks before any parse) -> TorchServe (with the inference key when token
authorization is on) -> TorchServe's answer, or the gate's own refusal in its place. Every answer, the
parser's own error pages included, is JSON or a static file with the security headers.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import math
import mimetypes
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web

from skinmodel.review_store import CLIENT_HEADER
from stack import gate_policy as policy
from stack.fairness import RateLimit, Shares, client_of
from stack.gate_server import SECURITY_HEADERS, GateServer, refuse
from stack.tokens import TokenFile
from stack.settings import MODEL_NAME, Settings, torchserve_config, url

log = logging.getLogger("gate")


@dataclass(frozen=True)
class GateLimits:
    max_body: int = int(torchserve_config("max_request_size"))  # TorchServe's own cap, in config.properties
    inflight_bytes: int = 64 * 2**20    # request bodies held at once, all connections together ...
    client_bytes: int = 12 * 2**20      # ... by one client (an address; an IPv6 /64): one largest upload, not two
    network_bytes: int = 40 * 2**20     # ... by one network (IPv4 /24, IPv6 /48): 3 clients' worth, never all
    per_client: int = 4                 # API requests in flight per client address: at most half of what
                                        # 2 workers x batch 4 take at once (a page sends 1 at a time)
    rate: float = 25.0                  # API requests per second per client, on average (about what the whole
    burst: int = 50                     # service answers on 2 cores), in bursts of up to `burst`; beyond: 429
    max_connections: int = 512
    per_address_connections: int = 64   # open connections per client (off behind a proxy) ...
    per_network_connections: int = 128  # ... and per network; silent connections are reclaimed first
    idle_s: float = 15.0                # keep-alive, and how long a client may take to send its headers
    body_s: float = 60.0                # to send the whole body (10 MiB needs >= 175 KB/s) ...
    stall_s: float = 5.0                # ... with never more than this between two pieces of it ...
    min_rate: int = 32 * 1024           # ... and at least this many bytes/s on average after the first second
    upstream_s: float = 60.0
    drain_rate: int = 8 * 2**20         # bytes/s of refused uploads read and dropped, all refusals together,
    drain_s: float = 10.0               # for at most this long per refusal
    retry_after_s: int = 2              # what a busy answer tells clients to wait
    restart_retry_after_s: int = 5      # ... and while TorchServe restarts or renews its keys
    versions: bool = False              # /predictions/<model>/<version>: the owner's (direct, with the key)


PROTOCOLS = ("torchserve", "kserve-v1")
DRAIN_CHUNK = 2**16  # bytes read at a time from a refused upload


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
        self.bodies = Shares(limits.inflight_bytes, limits.client_bytes, limits.network_bytes)
        self.rate = RateLimit(limits.rate, limits.burst)
        self.per_client: dict[str, int] = {}
        self.session: ClientSession | None = None
        self._drain_free_at = 0.0  # when the drain's shared rate has room for the next chunk
        self._name_key = os.urandom(16)  # clients' names upstream: keyed hashes, new with every start

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

    def _client_name(self, client: str) -> str:
        """What TorchServe's handler is told about a client: an opaque name, stable while this gate runs."""
        return hashlib.blake2b(client.encode(), key=self._name_key, digest_size=8).hexdigest()

    def _client(self, request: web.BaseRequest) -> tuple[str, str]:
        address = (request.headers.get(self.client_ip_header) if self.client_ip_header else None) or request.remote
        return client_of(address or "?")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        resp = await self._answer(request)
        if resp.status >= 400 and request.body_exists and not request.content.at_eof():
            resp.force_close()  # what is left of the body is drained at a bounded rate, or cut off with the connection
            try:
                await resp.prepare(request)  # the answer goes out first: a client waiting for it need not send more
                await resp.write_eof()
                # Not for a client cut off for sending too slowly, nor one that asked before sending (Expect)
                # and was refused instead of invited: it sends nothing more.
                if resp.status != 408 and request.headers.get("Expect", "").lower() != "100-continue":
                    await self._drain(request)
            except (ConnectionError, OSError):
                pass  # the client is gone: nothing to drain
        return resp

    async def _drain(self, request: web.BaseRequest) -> None:
        """Read and drop what a refused client is still sending, at GateLimits.drain_rate shared by every refusal
        and for at most drain_s, never stalled for stall_s; whatever is left then is cut off with the connection
        (the server's lingering close is off: it would read every refused byte at full speed on this event loop).
        Each chunk's slot in the shared rate is reserved before it is read, never beyond drain_s from now, so a
        flood of refusals cannot book the rate ahead of everyone else's."""
        loop, lim = asyncio.get_running_loop(), self.limits
        deadline = loop.time() + lim.drain_s
        while not request.content.at_eof():
            now = loop.time()
            start = max(now, self._drain_free_at)
            if start >= deadline:
                return
            self._drain_free_at = start + DRAIN_CHUNK / lim.drain_rate
            await asyncio.sleep(start - now)
            try:
                async with asyncio.timeout(max(0.0, min(lim.stall_s, deadline - loop.time()))):
                    if not await request.content.read(DRAIN_CHUNK):
                        return
            except TimeoutError:
                return

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        where = policy.route(request.method, request.path, self.limits.versions)
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
        client, group = self._client(request)
        wait = self.rate.allow(client)
        if wait:  # before anything is read or forwarded: a refusal here costs no audit row and no body
            return refuse(policy.Refusal(429, "too_many_requests", f"more than {self.limits.rate:g} requests per "
                                                                   "second from this client; slow down"),
                          max(1, math.ceil(wait)), close=True)
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
            return await self._api(request, client, group)
        finally:
            self.per_client[client] -= 1
            if not self.per_client[client]:
                del self.per_client[client]

    def _busy(self, limit: str) -> web.Response:
        if limit == "total":
            return refuse(policy.Refusal(503, "busy", "the service is receiving too many uploads right now; "
                                                      "retry shortly"), self.limits.retry_after_s, close=True)
        who = "this client" if limit == "client" else "this client's network"
        return refuse(policy.Refusal(429, "too_many_uploads", f"{who} is already sending as much as it may at "
                                                              "once; retry when an upload has finished"),
                      self.limits.retry_after_s, close=True)

    async def _api(self, request: web.BaseRequest, client: str, group: str) -> web.StreamResponse:
        length = policy.check_headers(request.headers, self.limits.max_body)
        if isinstance(length, policy.Refusal):
            return refuse(length, close=True)
        # The whole declared body is reserved before a byte of it is read (and before 100 Continue invites
        # it): an upload the budget cannot hold is refused at its headers.
        limit = self.bodies.take(client, group, length)
        if limit is not None:
            return self._busy(limit)
        held = length
        try:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # budget reserved: send the body
            body = await self._receive(request, length)
            if isinstance(body, web.Response):
                return body
            decision = policy.check_body(request.headers.get("Content-Type"), body)
            if isinstance(decision, policy.Refusal):
                return refuse(decision)
            forwarded = decision.body if decision.body is not None else body
            if self.protocol == "kserve-v1":
                # The v1 request holds the body again, base64-encoded (4/3): that much more of the byte budget.
                extra = len(forwarded) * 3 // 2
                limit = self.bodies.take(client, group, extra)
                if limit is not None:
                    return self._busy(limit)
                held += extra
                path, payload = to_kserve_v1(request.path, forwarded, decision.content_type)
                return await self._forward("POST", path, payload, "application/json", unwrap=True, client=client)
            return await self._forward(request.method, request.path, forwarded, decision.content_type, client=client)
        finally:
            self.bodies.give(client, group, held)

    async def _receive(self, request: web.BaseRequest, length: int) -> bytearray | web.Response:
        """The body, or a refusal: within body_s in all, never stalled for stall_s, and at min_rate on average
        after its first second (one client cannot hold its share of the budget by trickling)."""
        lim, body = self.limits, bytearray()
        loop = asyncio.get_running_loop()
        started = loop.time()
        while len(body) < length:
            elapsed = loop.time() - started
            if elapsed > lim.body_s or (elapsed > 1.0 and len(body) < lim.min_rate * (elapsed - 1.0)):
                return self._too_slow()
            try:
                async with asyncio.timeout(min(lim.stall_s, lim.body_s - elapsed)):
                    chunk = await request.content.read(min(2**16, length - len(body)))
            except TimeoutError:
                return self._too_slow()
            if not chunk:
                return refuse(policy.Refusal(400, "incomplete_body", "the connection ended before "
                                                                     "Content-Length bytes arrived"))
            body += chunk
        return body

    def _too_slow(self) -> web.Response:
        lim = self.limits
        return refuse(policy.Refusal(408, "body_timeout", f"the upload was too slow: it must arrive within "
                                                          f"{lim.body_s:.0f} s, at {lim.min_rate // 1024} KB/s or "
                                                          f"more, without pausing for {lim.stall_s:.0f} s"),
                      close=True)

    async def _forward(self, method: str, path: str, body: bytes | bytearray, content_type: str | None,
                       retry_auth: bool = True, unwrap: bool = False, client: str | None = None) -> web.StreamResponse:
        headers = {"Content-Type": content_type} if content_type else {}
        if client is not None:  # the handler's per-client share of the review folder (skinmodel/review_store.py)
            headers[CLIENT_HEADER] = self._client_name(client)
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
            return await self._forward(method, path, body, content_type, retry_auth=False, unwrap=unwrap,
                                       client=client)
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
        server = GateServer(self.handle, self.limits, per_address=self.client_ip_header is None,
                         keepalive_timeout=self.limits.idle_s, lingering_time=0, auto_decompress=False,
                         access_log=None, max_headers=64, handler_cancellation=True)
        self.runner = web.ServerRunner(server, shutdown_timeout=10)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]
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
    p.add_argument("--dist", help="the rendered page (python -m stack.page output); without it only the API is served "
                                   "(behind nginx, which serves the page itself)")
    p.add_argument("--upstream", required=True, help=f"TorchServe's inference URL, e.g. {Settings().inference_url}")
    p.add_argument("--key-file", help="TorchServe's key_file.json when token authorization is on")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=Settings.site_port)
    p.add_argument("--max-body", type=int, default=GateLimits.max_body)
    p.add_argument("--per-client", type=int, default=GateLimits.per_client,
                   help="API requests in flight per client address")
    p.add_argument("--rate", type=float, default=GateLimits.rate,
                   help="API requests per second per client on average (bursts of twice that); beyond: 429")
    p.add_argument("--versions", action="store_true",
                   help="serve /predictions/<model>/<version> (an owner's private entry only: at the public entry "
                        "any client could pick any registered version, canaries included)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="torchserve",
                   help="the upstream's API: TorchServe's REST API, or a KServe InferenceService's v1 protocol")
    p.add_argument("--client-ip-header", help="take the client's address from this header (X-Real-IP behind "
                                              "nginx); only when nothing but that proxy can reach the gate")
    args = p.parse_args(argv)
    if args.dist and not Path(args.dist, "index.html").is_file():
        print(f"error: {args.dist}/index.html is missing (render the page with python -m stack.page)", file=sys.stderr)
        return 1
    tokens = TokenFile(Path(args.key_file)) if args.key_file else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gate %(levelname)s %(message)s")

    async def serve() -> None:
        gate = Gate(Path(args.dist) if args.dist else None, args.upstream, tokens,
                    GateLimits(max_body=args.max_body, per_client=args.per_client, rate=args.rate,
                               burst=max(1, int(args.rate * 2)), versions=args.versions), args.client_ip_header,
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
