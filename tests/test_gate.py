"""The gate as a client meets it, over real sockets, in front of a real TorchServe with token authorization:
framing attacks get exactly one JSON answer with the security headers, limits answer fast and precisely,
refused uploads are answered (not reset), keys are renewed under it, TorchServe's own doors stay shut."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from stack.gate import GateLimits, GateThread
from stack.tokens import TokenFile
from stack.torchserve import TorchServe, free_port
from stress import bombs
from stress.request_attacks import session_from

REPO = Path(__file__).resolve().parents[1]
NAME = "skin-lesion"
API = f"/predictions/{NAME}"


@pytest.fixture(scope="module")
def ts(tiny_mar, tmp_path_factory):
    server = TorchServe(tiny_mar.parent, {NAME: tiny_mar.name}, tmp_path_factory.mktemp("ts-gate"), free_port(),
                        free_port(), free_port()).start()
    try:
        server.wait_ready(min_workers=2)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dist(tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "stack.page", "--meta", str(tiny_release / "meta.json"),
                    "--out", str(out)], cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture
def gate(ts, dist, request):
    limits = getattr(request, "param", GateLimits())
    # A key file reader of its own, as the separate gate process of ./skin up has.
    g = GateThread(dist, ts.inference_url, TokenFile(ts.tokens.path), limits=limits).start()
    yield g
    g.stop()


def exchange(port: int, data: bytes, wait: float = 5.0, source: str = "127.0.0.1", first_only: bool = False) -> bytes:
    """Send raw bytes, read until the server closes (or `wait` passes without a byte, or, with first_only,
    one whole response has arrived)."""
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    s.settimeout(wait)
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
            if first_only and responses(out) and b"\r\n\r\n" in out:
                head = out.split(b"\r\n\r\n", 1)
                n = int(dict(h.split(b": ", 1) for h in head[0].split(b"\r\n")[1:]).get(b"Content-Length", 0))
                if len(head[1]) >= n:
                    break
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    return out


def responses(raw: bytes) -> list[tuple[int, dict, dict]]:
    """(status, headers, JSON body) of each HTTP response in a byte stream."""
    out = []
    while raw.startswith(b"HTTP/1."):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        status = int(lines[0].split()[1])
        body, raw = rest[:n], rest[n:]
        out.append((status, headers, json.loads(body) if body and "json" in headers.get("content-type", "") else {}))
    return out


def assert_one_json_refusal(raw: bytes, status: int) -> dict:
    got = responses(raw)
    assert len(got) == 1, raw[:600]
    code, headers, body = got[0]
    assert code == status and body["status"] == status and body["reason"], got
    assert headers["x-content-type-options"] == "nosniff" and "frame-ancestors 'none'" in headers[
        "content-security-policy"]
    assert "python" not in headers.get("server", "").lower() and "aiohttp" not in headers.get("server", "")
    return body


POST = f"POST {API} HTTP/1.1\r\nHost: x\r\n".encode()


@pytest.mark.parametrize("name,request_bytes,status", [
    ("negative length", POST + b"Content-Length: -1\r\n\r\n", 400),
    ("non-numeric length", POST + b"Content-Length: 12abc\r\n\r\n", 400),
    ("duplicate length", POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("length and chunked", POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1"
                                  b"\r\nHost: x\r\n\r\n", 400),
    ("chunked only", POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
    ("no length", POST + b"\r\n", 411),
    ("unknown method", b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("line too long", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("header too large", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 400),
    ("too many headers", b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 400),
    ("not HTTP at all", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64) + b"\r\n\r\n", 400),
    ("management path", b"PUT /models/skin-lesion?min_worker=0 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n", 405),
    ("compressed body", POST + b"Content-Length: 4\r\nContent-Encoding: gzip\r\n\r\nabcd", 415),
    ("non-ASCII boundary", POST + "Content-Type: multipart/form-data; boundary=\"é\"\r\n".encode()
     + b"Content-Length: 4\r\n\r\nabcd", 400),
])
def test_malformed_framing_gets_exactly_one_json_answer(gate, name, request_bytes, status):
    assert_one_json_refusal(exchange(gate.gate.port, request_bytes), status)


def test_an_oversize_upload_is_answered_413_not_reset(gate):
    """Without Expect: 100-continue the client is already sending 11 MiB when the answer comes."""
    s = socket.create_connection(("127.0.0.1", gate.gate.port))
    s.sendall(POST + b"Content-Length: %d\r\n\r\n" % (11 * 2**20))
    sent, answer = 0, b""
    s.settimeout(10)
    try:
        while sent < 11 * 2**20:  # keep sending, as curl does, until the server has said no
            sent += s.send(b"\0" * 2**16)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    assert assert_one_json_refusal(answer, 413)["error"] == "too_large"


def test_expect_100_continue(gate, sample_images):
    s = socket.create_connection(("127.0.0.1", gate.gate.port))
    s.settimeout(10)
    s.sendall(POST + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (11 * 2**20))
    assert_one_json_refusal(s.recv(65536), 413)  # refused before a body byte was sent
    s.close()
    data = sample_images[0].read_bytes()
    s = socket.create_connection(("127.0.0.1", gate.gate.port))
    s.settimeout(30)
    s.sendall(POST + b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % len(data))
    assert s.recv(25).startswith(b"HTTP/1.1 100 Continue")
    s.sendall(data)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    assert b"HTTP/1.1 200" in out and b'"verdict"' in out


def test_nothing_the_client_sent_is_reflected(gate):
    for path in ("/<script>alert(1)</script>", "/predictions/<b>x</b>", "/predictions/nosuchmodel"):
        r = requests.post(gate.url + path, data=b"\xff\xd8\xff", timeout=30)
        assert r.status_code in (404, 405) and "<" not in r.text and "nosuchmodel" not in r.text, r.text


# Every header the gate promises, written out here (not read from the gate's own table): a header dropped from
# SECURITY_HEADERS, or an answer path that skips them, fails this test.
EXPECTED_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer"}


def test_keep_alive_and_security_headers_on_every_answer(gate, sample_images):
    with requests.Session() as s:
        answers = [s.get(gate.url + path, timeout=30) for path in ("/", "/app.js", "/nope", "/ping")]
        answers.append(s.post(gate.url + API, data=sample_images[0].read_bytes(), timeout=30))
        answers.append(s.post(gate.url + API, data=b"not an image", timeout=30))
        for r in answers:
            assert {k: r.headers.get(k) for k in EXPECTED_HEADERS} == EXPECTED_HEADERS, (r.url, r.status_code)
            assert r.headers["Content-Security-Policy"].startswith("default-src 'self'"), (r.url, r.status_code)
        assert answers[4].status_code == 200 and answers[5].status_code == 415
    assert responses(exchange(gate.gate.port, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n" * 3, wait=2))[2][0] == 200


def test_upload_shapes_and_body_policy_through_the_gate(gate, sample_images):
    data = sample_images[1].read_bytes()
    for kw in ({"data": data}, {"data": data, "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
               {"files": {"data": ("x.jpg", data, "image/jpeg")}}, {"json": {"data": base64.b64encode(data).decode()}}):
        r = requests.post(gate.url + API, timeout=30, **kw)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 7, (list(kw), r.text[:200])
    r = requests.post(gate.url + API, data=bombs.form_field_bomb(), timeout=30,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    body, ct = bombs.multipart_part_bomb()
    r = requests.post(gate.url + API, data=body, headers={"Content-Type": ct}, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "too_many_parts"
    r = requests.post(gate.url + API, data=b"[" * 500_000 + b"]" * 500_000, timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "bad_json"


@pytest.mark.parametrize("gate", [GateLimits(body_s=1.5, idle_s=1.5)], indirect=True)
def test_slow_clients_are_cut_off_and_their_bytes_released(gate):
    t0 = time.monotonic()
    raw = exchange(gate.gate.port, POST + b"Content-Length: 1000000\r\n\r\n" + b"\0" * 1000, wait=10, first_only=True)
    assert assert_one_json_refusal(raw, 408)["error"] == "body_timeout"
    assert time.monotonic() - t0 < 8 and gate.gate.bodies.used == 0
    t0 = time.monotonic()  # headers never finished: closed after the idle timeout, no thread or slot held
    assert exchange(gate.gate.port, b"GET / HTTP/1.1\r\nHost: x\r\n", wait=10) == b""
    assert time.monotonic() - t0 < 8


@pytest.mark.parametrize("gate", [GateLimits(per_address_connections=3)], indirect=True)
def test_one_address_cannot_take_every_connection(gate):
    held = [socket.create_connection(("127.0.0.1", gate.gate.port), source_address=("127.0.0.7", 0)) for _ in range(3)]
    for s in held:  # connections that have spoken (silent ones are reclaimed: tests/test_gate_fairness.py)
        s.sendall(b"GET / HTTP/1.1\r\n")
    try:
        time.sleep(0.3)
        raw = exchange(gate.gate.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.7")
        assert assert_one_json_refusal(raw, 503)["error"] == "busy"
        ok = exchange(gate.gate.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", source="127.0.0.8")
        assert responses(ok)[0][0] == 200
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("gate", [GateLimits(max_connections=5)], indirect=True)
def test_a_connection_cap_answers_503(gate):
    held = [socket.create_connection(("127.0.0.1", gate.gate.port)) for _ in range(5)]
    for s in held:
        s.sendall(b"GET / HTTP/1.1\r\n")
    try:
        time.sleep(0.3)
        body = assert_one_json_refusal(exchange(gate.gate.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 503)
        assert body["error"] == "busy"
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert responses(exchange(gate.gate.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))[0][0] == 200


def _half_upload(port: int, size: int, sent: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    s.sendall(POST + b"Content-Length: %d\r\n\r\n" % size + b"\0" * sent)
    return s


@pytest.mark.parametrize("gate", [GateLimits(inflight_bytes=2 * 2**20, per_client=2, stall_s=30, min_rate=1)],
                         indirect=True)
def test_byte_budget_and_per_client_cap(gate, sample_images):
    data = sample_images[0].read_bytes()
    assert len(data) < 2**19
    stalled = _half_upload(gate.gate.port, int(1.5 * 2**20), 2**20, source="127.0.0.3")
    try:
        deadline = time.monotonic() + 10
        while gate.gate.bodies.used < 1.5 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = requests.post(gate.url + API, data=b"\0" * 2**20, timeout=30)  # does not fit in what is left
        assert r.status_code == 503 and r.json()["error"] == "busy" and r.headers["Retry-After"]
        assert requests.post(gate.url + API, data=data, timeout=30).status_code == 200  # a small one still fits
        second = _half_upload(gate.gate.port, 1000, 10, source="127.0.0.1")
        third = _half_upload(gate.gate.port, 1000, 10, source="127.0.0.1")
        try:
            time.sleep(0.3)
            r = requests.post(gate.url + API, data=data, timeout=30)  # from 127.0.0.1: two already in flight
            assert r.status_code == 429 and r.json()["error"] == "too_many_requests" and r.headers["Retry-After"]
            other = session_from("127.0.0.2")
            assert other.post(gate.url + API, data=data, timeout=30).status_code == 200  # another client is served
        finally:
            second.close()
            third.close()
    finally:
        stalled.close()
    deadline = time.monotonic() + 10
    while gate.gate.bodies.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gate.gate.bodies.used == 0


def test_renewed_keys_do_not_interrupt_the_gate(gate, ts, sample_images):
    """The gate reads the key file itself: it notices the renewal (or retries once on a refused key)."""
    data = sample_images[2].read_bytes()
    assert requests.post(gate.url + API, data=data, timeout=30).status_code == 200
    held = gate.gate.tokens.keys()["inference"]
    ts.api.renew_keys()
    assert ts.tokens.keys()["inference"] != held
    assert requests.post(gate.url + API, data=data, timeout=30).status_code == 200
    assert gate.gate.tokens.keys()["inference"] == ts.tokens.keys()["inference"]


def test_torchserve_refuses_callers_without_the_keys(ts, sample_images):
    """Any local user reaches loopback; none but the owner can read the key file."""
    import grpc

    assert oct(ts.tokens.path.stat().st_mode & 0o777) == "0o600"
    r = requests.put(f"{ts.management_url}/models/{NAME}?min_worker=0&max_worker=0&synchronous=true", timeout=30)
    assert r.status_code == 400 and "InvalidKeyException" in r.text
    r = requests.post(f"{ts.inference_url}{API}", data=sample_images[0].read_bytes(), timeout=30)
    assert r.status_code == 400, "the inference API answered without a key: the gate can be bypassed"
    port = ts.overrides["grpc_management_port"]
    name = NAME.encode()
    scale = b"\x0a" + bytes([len(name)]) + name + b"\x18\x01\x20\x01\x30\x01"  # ScaleWorker(name, max 1, min 1)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/org.pytorch.serve.grpc.management.ManagementAPIsService/ScaleWorker")
        with pytest.raises(grpc.RpcError) as err:
            call(scale, timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(ts.workers(NAME)) == 2, "a keyless call changed the workers"
    try:  # the metrics API takes no key: it must not answer at all (usage side channel)
        metrics = requests.get(f"{ts.metrics_url}/metrics", timeout=10)
        assert metrics.status_code != 200 and "ts_inference_requests_total" not in metrics.text, metrics.text[:200]
    except requests.ConnectionError:
        pass
    if os.geteuid() == 0:  # the README's check, as another local user
        cmd = ["runuser", "-u", "nobody", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT",
               f"{ts.management_url}/models/{NAME}?min_worker=0&max_worker=0&synchronous=true"]
        assert subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout == "400"
        cat = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(ts.tokens.path)], capture_output=True)
        assert cat.returncode != 0
        assert len(ts.workers(NAME)) == 2


def test_a_stopped_torchserve_is_a_retryable_503(dist):
    g = GateThread(dist, f"http://127.0.0.1:{free_port()}").start()
    try:
        r = requests.post(g.url + API, data=b"\xff\xd8\xff", timeout=30)
        assert r.status_code == 503 and r.json()["error"] == "unavailable" and int(r.headers["Retry-After"]) >= 1
    finally:
        g.stop()


def test_many_concurrent_refusals_leave_the_gate_serving(gate, sample_images):
    def hammer():
        for _ in range(20):
            exchange(gate.gate.port, POST + b"Content-Length: abc\r\n\r\n", wait=2)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert requests.post(gate.url + API, data=sample_images[0].read_bytes(), timeout=30).status_code == 200
