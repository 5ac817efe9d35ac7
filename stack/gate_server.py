"""The gate's transport: aiohttp's low-level server with connection shares per client and per network, JSON
refusals with the security headers for everything the parser itself refuses, and the answer format shared
by every refusal of the gate (stack/gate.py).

Connections are counted as they arrive, before a byte is read. When a cap is passed (in all, per client,
per network), a connection that never sent a byte is the first to go: the oldest one in the scope of that cap
that has been silent for SILENT_GRACE_S is closed and the newcomer stays. Only when there is none is the
newcomer refused (a 503 written straight to the socket). So holding connections open without speaking
reserves nothing, while a client's connection that is just about to send its request (a few ms after
connecting) is never taken for an idle one.

aiohttp's public API has no hook on a connection before its first request is parsed, so this is the one place the
gate goes below it: GateServer subclasses the low-level `web.Server` (public) and builds its protocol, a subclass
of `aiohttp.web_protocol.RequestHandler` (importable, not part of `aiohttp.web`), from Server's `_loop` and
`_kwargs`. aiohttp is pinned in requirements.txt; tests/test_gate_fairness.py exercises every path that uses them.
Everything else (stack/gate.py) uses the documented request API.
"""
from __future__ import annotations

import json
import logging
import re
import time

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from stack import gate_policy as policy
from stack.fairness import Shares, client_of

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
SILENT_GRACE_S = 1.0


def error_body(status: int, code: str, reason: str, retry_after: int | None) -> tuple[bytes, dict]:
    body = {"error": code, "reason": reason, "status": status}
    headers = {**SECURITY_HEADERS, "Content-Type": "application/json"}
    if retry_after is not None:
        body["retry_after_s"] = retry_after
        headers["Retry-After"] = str(retry_after)
    return json.dumps(body).encode(), headers


def refuse(r: policy.Refusal, retry_after: int | None = None, close: bool = False) -> web.Response:
    """A refusal as JSON with the security headers; close=True also ends the connection (after Gate._drain has
    read what the client was still sending, so the client reads this answer instead of a reset)."""
    body, headers = error_body(r.status, r.code, r.reason, retry_after)
    resp = web.Response(status=r.status, body=body, headers=headers)
    if close:
        resp.force_close()
    return resp


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
    spoke = False  # has this connection sent a byte yet?

    def data_received(self, data: bytes) -> None:
        if data:
            self.spoke = True
        super().data_received(data)

    def handle_error(self, request, status=500, exc=None, message=None):
        """The parser's own refusals (bad framing, oversize headers, unknown methods) and any unforeseen
        failure, as JSON with the headers; failures are logged, refusals are not (they are the clients')."""
        if status >= 500:
            log.error("unexpected failure answering a request", exc_info=exc)
            return refuse(policy.Refusal(500, "server_error", "internal error"), close=True)
        return refuse(policy.Refusal(status, "bad_request", _parser_reason(exc)), close=True)


class GateServer(Server):
    """aiohttp's low-level server with connection caps in all, per client and per network (the last two off
    behind a proxy, where every connection comes from the proxy)."""

    def __init__(self, handler, limits, per_address: bool, **kw):
        super().__init__(handler, **kw)
        self.limits, self.per_address = limits, per_address
        big = limits.max_connections + 1
        self.counts = Shares(limits.max_connections, limits.per_address_connections if per_address else big,
                             limits.per_network_connections if per_address else big)
        self.conns: dict = {}  # handler -> (client, group, transport, opened); in arrival order
        self.reclaimed = 0

    def __call__(self):
        return _Protocol(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler, transport) -> None:
        super().connection_made(handler, transport)
        address = (transport.get_extra_info("peername") or ("?",))[0]
        client, group = client_of(str(address)) if self.per_address else ("proxy", "proxy")
        self.conns[handler] = (client, group, transport, time.monotonic())
        self.counts.add(client, group, 1)
        while (limit := self.counts.over(client, group, 0)) is not None:
            victim = self._oldest_silent(limit, client, group, handler)
            if victim is None:
                self._drop(handler)
                reason = {"total": "too many connections", "client": "too many connections from this address",
                          "group": "too many connections from this network"}[limit]
                self._refuse(transport, reason + "; retry shortly")
                return
            self.reclaimed += 1
            victim_transport = self.conns[victim][2]
            self._drop(victim)
            victim_transport.close()

    def _oldest_silent(self, limit: str, client: str, group: str, newcomer):
        """The oldest connection in the cap's scope silent for SILENT_GRACE_S, else None (arrival order: the
        scan stops at the first one younger than that)."""
        cutoff = time.monotonic() - SILENT_GRACE_S
        for h, (c, g, _, opened) in self.conns.items():
            if opened > cutoff:
                return None
            if h is not newcomer and not h.spoke and (limit == "total" or (c == client if limit == "client"
                                                                           else g == group)):
                return h
        return None

    def _drop(self, handler) -> None:
        entry = self.conns.pop(handler, None)
        if entry is not None:
            self.counts.give(entry[0], entry[1], 1)

    def connection_lost(self, handler, exc=None) -> None:
        self._drop(handler)
        super().connection_lost(handler, exc)

    def _refuse(self, transport, reason: str) -> None:
        """Before a request is even parsed: a complete 503 written straight to the socket, then close."""
        body, headers = error_body(503, "busy", reason, self.limits.retry_after_s)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        transport.write(f"HTTP/1.1 503 Service Unavailable\r\n{head}Content-Length: {len(body)}\r\n"
                        f"Connection: close\r\n\r\n".encode() + body)
        transport.close()
