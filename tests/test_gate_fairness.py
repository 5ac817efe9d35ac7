"""No few clients can shut others out of the gate: shares of connections and of the body budget per client and
per network, silent connections reclaimed first, stalled uploads cut, a request rate, `Expect` answered only
once the body has room, model versions kept for the owner. Over real sockets, in front of a real TorchServe;
each client is its own loopback address (all of 127/8 is loopback), networks are their /24s."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest
import requests

from stack.fairness import RateLimit, Shares, client_of
from stack.gate import GateLimits, GateThread
from stack.gate_server import SILENT_GRACE_S
from stress.request_attacks import session_from
from tests.test_gate import API, POST, assert_one_json_refusal, dist, exchange, gate, responses, ts  # noqa: F401

GET_CLOSE = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def connect(port: int, source: str, speak: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    if speak:
        s.sendall(speak)
    return s


def closed_by_server(s: socket.socket, wait: float = 3.0) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


@pytest.mark.fast
def test_clients_and_networks():
    assert client_of("192.0.2.7") == ("192.0.2.7", "192.0.2.0/24")
    assert client_of("::ffff:192.0.2.7") == ("192.0.2.7", "192.0.2.0/24")
    assert client_of("2001:db8:1:2:aaaa::1") == ("2001:db8:1:2::/64", "2001:db8:1::/48")
    assert client_of("2001:db8:1:2:bbbb::9")[0] == client_of("2001:db8:1:2:aaaa::1")[0]  # one host, many addresses
    shares = Shares(total=9, per_client=4, per_group=6)
    assert shares.take("a", "n", 4) is None and shares.take("a", "n", 1) == "client"
    assert shares.take("b", "n", 3) == "group" and shares.take("c", "m", 4) is None
    assert shares.take("d", "l", 2) == "total"
    shares.give("a", "n", 4)
    shares.give("c", "m", 4)
    assert shares.used == 0 and not shares.held
    now = [0.0]
    rate = RateLimit(rate=2, burst=3, clock=lambda: now[0])
    assert [rate.allow("x") for _ in range(3)] == [0, 0, 0] and rate.allow("x") == pytest.approx(0.5)
    assert rate.allow("y") == 0
    now[0] = 0.5
    assert rate.allow("x") == 0
    rate.MAX_CLIENTS = 3  # bounded bookkeeping: the least recently seen client is forgotten
    for c in ("a", "b", "c", "x"):
        rate.allow(c)
    assert list(rate.buckets) == ["b", "c", "x"]


@pytest.mark.parametrize("gate", [GateLimits(max_connections=5)], indirect=True)
def test_silent_connections_are_reclaimed_first(gate):
    """Connections that never sent a byte fill the total: a newcomer still gets in, the oldest silent one goes.
    Connections that have spoken, or were opened just now, are not reclaimed: then the newcomer is refused."""
    port = gate.gate.port
    silent = [connect(port, "127.0.20.1") for _ in range(5)]
    try:
        time.sleep(0.3)  # opened just now: could be about to send their requests
        assert assert_one_json_refusal(exchange(port, GET_CLOSE, source="127.0.21.1"), 503)["error"] == "busy"
        time.sleep(SILENT_GRACE_S)
        assert responses(exchange(port, GET_CLOSE, source="127.0.21.1"))[0][0] == 200
        assert closed_by_server(silent[0]) and not closed_by_server(silent[-1], wait=0.3)
    finally:
        for s in silent:
            s.close()
    time.sleep(0.3)
    speaking = [connect(port, "127.0.20.1", b"GET / HTTP/1.1\r\n") for _ in range(5)]
    try:
        time.sleep(0.3)
        assert assert_one_json_refusal(exchange(port, GET_CLOSE, source="127.0.21.1"), 503)["error"] == "busy"
    finally:
        for s in speaking:
            s.close()


@pytest.mark.parametrize("gate", [GateLimits(per_address_connections=3, per_network_connections=4)], indirect=True)
def test_a_network_gets_a_share_of_the_connections(gate):
    """Two addresses of one /24 together hold at most the network's share; another network is not touched."""
    port = gate.gate.port
    held = [connect(port, src, b"GET / HTTP/1.1\r\n") for src in ("127.0.30.1", "127.0.30.2") for _ in range(2)]
    try:
        time.sleep(0.3)
        body = assert_one_json_refusal(exchange(port, GET_CLOSE, source="127.0.30.3"), 503)
        assert "network" in body["reason"]
        assert responses(exchange(port, GET_CLOSE, source="127.0.31.1"))[0][0] == 200
    finally:
        for s in held:
            s.close()


def _upload_head(size: int, expect: bool = False) -> bytes:
    return POST + b"Content-Length: %d\r\n%s\r\n" % (size, b"Expect: 100-continue\r\n" if expect else b"")


@pytest.mark.parametrize("gate", [GateLimits(inflight_bytes=8 * 2**20, client_bytes=2 * 2**20,
                                             network_bytes=3 * 2**20, stall_s=30, min_rate=1)], indirect=True)
def test_one_client_or_network_cannot_hold_the_body_budget(gate, sample_images):
    """Uploads stopping one byte short: one address holds at most its share, its network at most the
    network's, refused at their headers (429, no body read); a user elsewhere is served meanwhile."""
    port, image = gate.gate.port, sample_images[0].read_bytes()
    first = connect(port, "127.0.40.1", _upload_head(2 * 2**20) + b"\0" * (2 * 2**20 - 1))
    try:
        deadline = time.monotonic() + 10
        while gate.gate.bodies.used < 2 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.05)
        body = assert_one_json_refusal(exchange(port, _upload_head(2**17), source="127.0.40.1", first_only=True), 429)
        assert body["error"] == "too_many_uploads" and "this client" in body["reason"]
        body = assert_one_json_refusal(exchange(port, _upload_head(1_500_000), source="127.0.40.2",
                                                first_only=True), 429)
        assert "network" in body["reason"]
        assert session_from("127.0.41.1").post(gate.url + API, data=image, timeout=60).status_code == 200
    finally:
        first.close()


@pytest.mark.parametrize("gate", [GateLimits(inflight_bytes=2**20, stall_s=30, min_rate=1)], indirect=True)
def test_expect_is_answered_after_the_budget_check(gate):
    """100 Continue invites the body: it is sent only once the budget holds the declared length."""
    port = gate.gate.port
    holder = connect(port, "127.0.50.1", _upload_head(900_000) + b"\0" * 1000)
    try:
        deadline = time.monotonic() + 10
        while gate.gate.bodies.used < 900_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        raw = exchange(port, _upload_head(500_000, expect=True), source="127.0.51.1", first_only=True)
        assert not raw.startswith(b"HTTP/1.1 100")
        assert assert_one_json_refusal(raw, 503)["error"] == "busy"
        s = connect(port, "127.0.51.1", _upload_head(50_000, expect=True))
        s.settimeout(5)
        assert s.recv(25).startswith(b"HTTP/1.1 100 Continue")  # one that fits is invited
        s.close()
    finally:
        holder.close()


@pytest.mark.parametrize("gate", [GateLimits(stall_s=1.0, body_s=30, min_rate=64 * 1024)], indirect=True)
def test_stalled_and_trickling_uploads_are_cut_and_release_their_share(gate):
    port = gate.gate.port
    t0 = time.monotonic()  # everything but the last byte, then silence
    raw = exchange(port, _upload_head(100_000) + b"\0" * 99_999, wait=15, first_only=True, source="127.0.60.1")
    assert assert_one_json_refusal(raw, 408)["error"] == "body_timeout" and time.monotonic() - t0 < 5
    s = connect(port, "127.0.60.2", _upload_head(5 * 2**20))  # 2 KB every 0.5 s: never stalled, far too slow
    t0, answer = time.monotonic(), b""
    s.setblocking(False)
    while time.monotonic() - t0 < 15 and not answer:
        try:
            s.send(b"\0" * 2048)
            answer = s.recv(4096)
        except BlockingIOError:
            time.sleep(0.5)
        except OSError:
            break
    s.close()
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 8, answer[:80]
    deadline = time.monotonic() + 5
    while gate.gate.bodies.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gate.gate.bodies.used == 0


@pytest.mark.parametrize("gate", [GateLimits(rate=2, burst=3)], indirect=True)
def test_a_request_rate_per_client(gate):
    """Beyond the rate: 429 with Retry-After, before the body is read or anything reaches TorchServe (so a flood
    of cheap refusals cannot become audit rows); another client is not slowed."""
    flood, other = session_from("127.0.70.1"), session_from("127.0.71.1")
    got = [flood.post(gate.url + API, data=b"not an image", timeout=30) for _ in range(6)]
    statuses = [r.status_code for r in got]
    assert statuses[:3] == [415] * 3 and 429 in statuses[3:], statuses
    refused = next(r for r in got if r.status_code == 429)
    assert refused.json()["error"] == "too_many_requests" and int(refused.headers["Retry-After"]) >= 1
    assert other.post(gate.url + API, data=b"not an image", timeout=30).status_code == 415


def test_model_versions_only_at_the_owners_entry(ts, dist, sample_images):
    image = sample_images[0].read_bytes()
    version = ts.api.session.get(f"{ts.management_url}/models/skin-lesion", timeout=30,
                                 headers=ts.api.headers("management")).json()[0]["modelVersion"]
    public = GateThread(dist, ts.inference_url, ts.tokens).start()
    owner = GateThread(None, ts.inference_url, ts.tokens, limits=GateLimits(versions=True)).start()
    try:
        r = requests.post(f"{public.url}{API}/{version}", data=image, timeout=60)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        assert requests.post(f"{owner.url}{API}/{version}", data=image, timeout=60).status_code == 200
    finally:
        public.stop()
        owner.stop()


async def _booked_ahead(gate) -> float:
    return gate._drain_free_at - asyncio.get_running_loop().time()


@pytest.mark.parametrize("gate", [GateLimits(drain_rate=2**20, drain_s=20)], indirect=True)
def test_refused_uploads_are_drained_at_a_bounded_rate(gate):
    """A refusal is answered at the headers, then what the client still sends is read at GateLimits.drain_rate
    (shared by every refusal), not as fast as loopback carries it: after 3 s one refused 400 MiB upload has got
    at most ~3 MiB past the socket buffers, and another refused upload meanwhile still gets its answer."""
    port, declared = gate.gate.port, 400 * 2**20
    s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.60.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**16)
    s.sendall(POST + f"Content-Length: {declared}\r\n\r\n".encode())
    s.settimeout(5)
    assert assert_one_json_refusal(s.recv(4096), 413)["error"] == "too_large"  # answered before the body
    s.setblocking(False)
    sent, chunk, t0 = 0, b"\0" * 2**16, time.monotonic()
    while time.monotonic() - t0 < 3.0:
        try:
            sent += s.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
    other = exchange(port, POST + b"Content-Length: 20000000\r\n\r\n", source="127.0.61.1", first_only=True)
    assert assert_one_json_refusal(other, 413)["error"] == "too_large"
    ahead = asyncio.run_coroutine_threadsafe(_booked_ahead(gate.gate), gate.loop).result(5)
    assert ahead <= gate.gate.limits.drain_s + 1, f"the shared drain rate is booked {ahead:.0f} s ahead"
    s.close()
    # 3 s at 1 MiB/s, plus what the kernel buffers on both sides of one loopback connection (a few MiB)
    assert sent < 16 * 2**20, f"{sent / 2**20:.0f} MiB of a refused upload read in 3 s"


@pytest.mark.parametrize("gate", [GateLimits(drain_rate=2**20, drain_s=5)], indirect=True)
def test_a_churn_of_refusals_cannot_book_the_drain_rate_ahead(gate):
    """200 refused uploads in a row, each sending 256 KiB and leaving: the shared drain rate (1 MiB/s here) is
    never booked more than drain_s ahead (each refusal reserves before it reads and gives up past drain_s), so
    a refusal a minute later is drained like any other, not cut off behind a backlog."""
    port = gate.gate.port
    for i in range(200):
        s = connect(port, f"127.0.7{i % 5}.1", POST + f"Content-Length: {400 * 2**20}\r\n\r\n".encode())
        try:
            s.sendall(b"\0" * 2**18)
        except OSError:
            pass
        s.close()
    time.sleep(0.5)
    ahead = asyncio.run_coroutine_threadsafe(_booked_ahead(gate.gate), gate.loop).result(5)
    assert ahead <= gate.gate.limits.drain_s + 0.5, f"the shared drain rate is booked {ahead:.0f} s ahead"
