"""The attacks of issue 23 that aim at sharing (stress/attacks.py runs them with the others): one client, or a
few addresses of one network, trying to take the gate's event loop, body budget, connections or audit trail
from everyone else. Each records what the attacker got; the normal user runs beside it (stress/attacks.py)."""
from __future__ import annotations

import socket
import threading
import time

from stack.settings import MODEL_NAME
from stress import bombs

API = f"/predictions/{MODEL_NAME}"
# Attackers' addresses: 127.0.0.3-10, the normal user's network (127.0.0.2 is the user): the worst case for the
# per-network shares, which the user shares with them.
HOGS = [f"127.0.0.{i}" for i in range(3, 11)]


def json_key_bomb(size: int = bombs.MAX_BODY) -> bytes:
    """A JSON object of short keys filling `size` bytes (about 870 k keys in 10 MiB)."""
    parts, n, i = [], 2, 0
    while n + 14 < size:
        item = f'"k{i}":1'
        parts.append(item)
        n += len(item) + 1
        i += 1
    return ("{" + ",".join(parts) + "}").encode()


def raw_exchange(port: int, data: bytes, wait: float = 10.0, source: str = "127.0.0.1") -> bytes:
    """Send raw bytes from `source` and read until the server closes (or `wait` passes without a byte)."""
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=wait)
    out = b""
    try:
        s.sendall(data)
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    finally:
        s.close()
    return out


def _post(port: int, source: str, body: bytes, headers: str = "", wait: float = 30.0) -> tuple[object, float]:
    t0 = time.perf_counter()
    try:
        answer = raw_exchange(port, f"POST {API} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}"
                                    f"Connection: close\r\n\r\n".encode() + body, wait, source)
    except OSError as exc:
        return type(exc).__name__, 0.0
    status = int(answer[9:12]) if answer.startswith(b"HTTP/1.") else "no answer"
    return status, (time.perf_counter() - t0) * 1000


def json_keys(stack, out, stop, clients=2):
    """10 MiB of JSON with ~870 k keys, over and over: parsed, it held the gate's one event loop 0.5 s a time."""
    body = json_key_bomb()

    def client():
        while not stop.is_set():
            out.record(*_post(stack.ports["site"], "127.0.0.1", body, "Content-Type: application/json\r\n"))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def _hold_upload(port: int, source: str, out, stop) -> None:
    """A 10 MiB upload that stops one byte short, then waits to be cut; again and again."""
    size = bombs.MAX_BODY
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=30)
            s.sendall(f"POST {API} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
            s.sendall(b"\0" * (size - 1))
            answer = s.recv(4096)
            s.close()
            out.record(int(answer[9:12]) if answer.startswith(b"HTTP/1.") else "closed", (time.perf_counter() - t0) * 1000)
        except OSError as exc:
            out.record(type(exc).__name__, (time.perf_counter() - t0) * 1000)
            stop.wait(0.2)


def budget_hog(stack, out, stop, per_address=4):
    """Uploads from two addresses that stop one byte short (7 of them once held the whole 64 MiB)."""
    threads = [threading.Thread(target=_hold_upload, args=(stack.ports["site"], src, out, stop), daemon=True)
               for src in HOGS[:2] for _ in range(per_address)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def silent_connections(stack, out, stop, addresses=8, each=64):
    """8 addresses x 64 connections that never send a byte (the 512 total, once), while new visitors arrive
    from another network: each visitor's answer is recorded as 'visitor: <status>'."""
    port, socks = stack.ports["site"], []
    for src in HOGS[:addresses]:
        for _ in range(each):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), source_address=(src, 0), timeout=5))
            except OSError as exc:
                out.record(type(exc).__name__, 0)
    i = 0
    while not stop.is_set():
        i += 1
        t0 = time.perf_counter()
        try:
            v = socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.1.{i % 200 + 1}", 0), timeout=10)
            v.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = v.recv(64)
            v.close()
            status = int(answer[9:12]) if answer.startswith(b"HTTP/1.") else "closed"
        except OSError as exc:
            status = type(exc).__name__
        out.record(f"visitor: {status}", (time.perf_counter() - t0) * 1000)
        # reopen what the gate reclaimed, as an attacker would
        for k, s in enumerate(socks):
            if _closed(s):
                s.close()
                try:
                    socks[k] = socket.create_connection(("127.0.0.1", port), source_address=(HOGS[k // each], 0),
                                                        timeout=5)
                except OSError:
                    pass
        stop.wait(0.25)
    for s in socks:
        s.close()


def _closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


def refusal_flood(stack, out, stop, clients=8):
    """Cheap refusals as fast as 8 connections allow (425 req/s once, each an audit row): past the rate, 429s
    that never reach TorchServe, so never an audit row."""
    def client():
        while not stop.is_set():
            out.record(*_post(stack.ports["site"], "127.0.0.1", b"not an image"))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def versions(stack, out, stop):
    """A registered version picked by path (a canary, say): not at the public entry (404)."""
    port = stack.ports["site"]
    while not stop.is_set():
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.1", 0), timeout=10)
        s.sendall(f"POST {API}/1.0 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc".encode())
        answer = s.recv(64)
        s.close()
        out.record(f"version path: {answer[9:12].decode() or 'none'}", (time.perf_counter() - t0) * 1000)
        stop.wait(0.5)


ATTACKS = {"json-keys": json_keys, "budget-hog": budget_hog, "silent-connections": silent_connections,
           "refusal-flood": refusal_flood, "versions": versions}
