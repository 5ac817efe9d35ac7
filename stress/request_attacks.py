"""The requests of the hostile-traffic run (stress/attacks.py measures them): each attack sends from the attacker's
address until `stop` is set and records what it got in an Outcome. The attacks on sharing are in
stress/fair_attacks.py, the decoder bombs' files in stress/bombs.py."""
from __future__ import annotations

import random
import socket
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from stack.settings import MODEL_NAME
from stack.torchserve_api import RETRY_POLICY
from stress import bombs, fair_attacks
from stress.fair_attacks import raw_exchange


API = f"/predictions/{MODEL_NAME}"
ATTACKER, USER = "127.0.0.1", "127.0.0.2"  # all of 127/8 is loopback: two clients the gate can tell apart


class SourceAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter whose connections leave from a chosen local address."""

    def __init__(self, source: str, **kw):
        self.source = source
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw):
        kw["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kw)


def session_from(source: str, retry: bool = False) -> requests.Session:
    """A session leaving from `source`; retry=True: with the clients' retry policy (stack/torchserve_api.py)."""
    s = requests.Session()
    s.mount("http://", SourceAdapter(source, max_retries=RETRY_POLICY if retry else 0))
    return s


@dataclass
class Outcome:
    name: str
    attacker: Counter = field(default_factory=Counter)
    attacker_ms: list = field(default_factory=list)
    user: Counter = field(default_factory=Counter)
    user_ms: list = field(default_factory=list)
    peak_mb: dict = field(default_factory=dict)
    restarts: dict = field(default_factory=dict)  # child -> 1 if its process changed during the attack
    stack_up: bool = True
    note: str = ""
    cpu_s: dict = field(default_factory=dict)  # CPU seconds during the attack: the attacker's process, each part

    def record(self, status, ms: float) -> None:
        self.attacker[status] += 1
        self.attacker_ms.append(ms)

    def summary(self) -> dict:
        p50 = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
        return {"attack": self.name, "attacker": dict(self.attacker), "attacker_p50_ms": p50(self.attacker_ms),
                "user_ok": self.user.get(200, 0), "user_sent": sum(self.user.values()),
                "user_statuses": dict(self.user), "user_p50_ms": p50(self.user_ms), "peak_mb": self.peak_mb,
                "restarts": self.restarts, "stack_up": self.stack_up, "note": self.note, "cpu_s": self.cpu_s}


def _timed_post(session, url, out: Outcome, stop: threading.Event, **kw) -> None:
    t0 = time.perf_counter()
    try:
        r = session.post(url, timeout=120, **kw)
        status = r.status_code
    except requests.RequestException as exc:
        status = type(exc).__name__
    if not stop.is_set() or status != "ConnectionError":
        out.record(status, (time.perf_counter() - t0) * 1000)


# ---- the attacks: each one runs until `stop` is set and records what the attacker got ---------------------

def form_bomb(stack, out, stop):
    s, body = session_from(ATTACKER), bombs.form_field_bomb()
    while not stop.is_set():
        _timed_post(s, stack.page_url + API, out, stop, data=body,
                    headers={"Content-Type": "application/x-www-form-urlencoded"})


def multipart_bomb(stack, out, stop):
    s, (body, ct) = session_from(ATTACKER), bombs.multipart_part_bomb()
    while not stop.is_set():
        _timed_post(s, stack.page_url + API, out, stop, data=body, headers={"Content-Type": ct})


def _flood(url, body, clients, out, stop, headers=None):
    def client():
        s = session_from(ATTACKER)
        while not stop.is_set():
            _timed_post(s, url, out, stop, data=body, headers=headers)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(timeout=130)


def flood_page(stack, out, stop, clients=32):
    _flood(stack.page_url + API, bombs.large_jpeg(), clients, out, stop)


def flood_direct(stack, out, stop, clients=32):
    """The owner (who holds the key) floods TorchServe itself: only its own sizing protects it here."""
    _flood(stack.inference_url + API, bombs.large_jpeg(), clients, out, stop, headers=stack.tokens.header("inference"))


def random_bodies(stack, out, stop, clients=90):
    rng = random.Random(0)
    bodies = [rng.randbytes(rng.randint(1, 10) * bombs.MAX_BODY // 10 - 1) for _ in range(6)]

    def client(i):
        s = session_from(ATTACKER)
        while not stop.is_set():
            _timed_post(s, stack.page_url + API, out, stop, data=bodies[i % len(bodies)])

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))


def scan_bomb(stack, out, stop):
    s, body = session_from(ATTACKER), bombs.progressive_scan_bomb()
    while not stop.is_set():
        _timed_post(s, stack.page_url + API, out, stop, data=body, headers={"Content-Type": "image/jpeg"})


def decoder_bombs(stack, out, stop):
    """Each payload recorded as 'name: status': the float TIFF and the 40 MP PNG fit the decoding budget
    (200), the formats the page never promised must be 415."""
    s = session_from(ATTACKER)
    payloads = {"float TIFF": bombs.float_tiff(), "40 MP PNG": bombs.png_with_size(7300, 5470),
                **bombs.unpromised_formats()}
    while not stop.is_set():
        for label, body in payloads.items():
            t0 = time.perf_counter()
            try:
                status = s.post(stack.page_url + API, data=body, timeout=120).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            out.record(f"{label}: {status}", (time.perf_counter() - t0) * 1000)


FRAMING = [b"Content-Length: -1\r\n\r\n", b"Content-Length: 12abc\r\n\r\n",
           b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
           b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]


def framing(stack, out, stop):
    port = stack.ports["site"]
    while not stop.is_set():
        for tail in FRAMING:
            t0 = time.perf_counter()
            raw = raw_exchange(port, f"POST {API} HTTP/1.1\r\nHost: x\r\n".encode() + tail)
            answers = raw.count(b"HTTP/1.")
            out.record(int(raw[9:12]) if answers == 1 else f"{answers} answers", (time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()  # oversize, no Expect: the client is already sending when the 413 comes
        s = socket.create_connection(("127.0.0.1", port), source_address=(ATTACKER, 0))
        s.settimeout(10)
        answer = b""
        try:
            s.sendall(f"POST {API} HTTP/1.1\r\nHost: x\r\nContent-Length: {bombs.MAX_BODY + 2**20}\r\n\r\n".encode())
            for _ in range(176):
                s.sendall(b"\0" * 2**16)
        except OSError:
            pass
        try:
            answer = s.recv(4096)
        except OSError:
            pass
        s.close()
        out.record(int(answer[9:12]) if answer.startswith(b"HTTP/1.") else "reset", (time.perf_counter() - t0) * 1000)


def slow_bodies(stack, out, stop, uploads=60, idle=300):
    """60 uploads of 10 MiB trickling at 4 KB/s, 300 connections that never finish their headers; all
    released at once at the end (that release used to crash the JVM)."""
    port, socks = stack.ports["site"], []
    for i in range(uploads + idle):
        try:
            s = socket.create_connection(("127.0.0.1", port), source_address=(ATTACKER, 0))
            s.setblocking(False)
            head = f"POST {API} HTTP/1.1\r\nHost: x\r\nContent-Length: {bombs.MAX_BODY}\r\n\r\n" if i < uploads \
                else "GET / HTTP/1.1\r\nHost: x\r\n"
            s.send(head.encode())
            socks.append((s, i < uploads, time.perf_counter()))
        except OSError as exc:
            out.record(type(exc).__name__, 0)
    while not stop.is_set():
        for s, uploading, _ in socks:
            if uploading:
                try:
                    s.send(b"\0" * 1024)
                except OSError:
                    pass
        time.sleep(0.25)
    # Unfinished headers are closed after the gate's idle timeout (15 s): give it that long to do so.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(_answered(sock) for sock, uploading, _ in socks if not uploading):
        time.sleep(0.5)
    for s, _, t0 in socks:
        try:
            data = s.recv(4096)
            out.record(int(data[9:12]) if data.startswith(b"HTTP/1.") else "closed by the gate",
                       (time.perf_counter() - t0) * 1000)
        except BlockingIOError:
            out.record("still open", (time.perf_counter() - t0) * 1000)
        except OSError:
            out.record("closed by the gate", (time.perf_counter() - t0) * 1000)
        s.close()


def connection_flood(stack, out, stop, connections=1000):
    """1,000 connections from one address that never send a byte: more than the gate's 512 in all."""
    socks = []
    for _ in range(connections):
        t0 = time.perf_counter()
        try:
            s = socket.create_connection(("127.0.0.1", stack.ports["site"]), source_address=(ATTACKER, 0))
            s.setblocking(False)
            socks.append((s, t0))
        except OSError as exc:
            out.record(type(exc).__name__, 0)
    time.sleep(0.5)
    for s, t0 in socks:
        try:
            data = s.recv(4096)
            out.record(int(data[9:12]) if data.startswith(b"HTTP/1.") else "closed by the gate",
                       (time.perf_counter() - t0) * 1000)
        except BlockingIOError:
            out.record("held open", (time.perf_counter() - t0) * 1000)
        except OSError:
            out.record("closed by the gate", (time.perf_counter() - t0) * 1000)
    stop.wait()
    for s, _ in socks:
        s.close()


def _answered(sock: socket.socket) -> bool:
    """A non-blocking socket the server has written to or closed."""
    try:
        sock.recv(1, socket.MSG_PEEK)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def kill_jvm(stack, out, stop):
    """Not an attack from outside: the JVM dies (kill -9) and the supervisor must bring it back."""
    victim = stack.find("org.pytorch.serve.ModelServer")
    t0 = time.perf_counter()
    victim.kill()
    out.record("JVM killed", 0)
    s = session_from(ATTACKER)
    while not stop.is_set():
        r = s.get(stack.page_url + "/ping", timeout=30)
        if r.status_code == 200:
            out.record("back", (time.perf_counter() - t0) * 1000)
            break
        time.sleep(0.2)
    stop.wait()


ATTACKS = {"form-bomb": form_bomb, "multipart-bomb": multipart_bomb, "flood-page": flood_page,
           "flood-direct": flood_direct, "random-bodies": random_bodies, "scan-bomb": scan_bomb,
           "decoder-bombs": decoder_bombs, "framing": framing, "slow-bodies": slow_bodies,
           "connection-flood": connection_flood, "kill-jvm": kill_jvm, **fair_attacks.ATTACKS}
QUICK = ["form-bomb", "multipart-bomb", "scan-bomb", "decoder-bombs", "framing", "slow-bodies", "connection-flood",
         "flood-page", *fair_attacks.ATTACKS]
