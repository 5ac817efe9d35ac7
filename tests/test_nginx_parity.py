"""docker/nginx.conf, run in a real nginx in front of the gate as compose does, answers what the gate alone
(`./skin up`) answers: the same status and error code for every policy case, one JSON answer with the
security headers for every framing attack."""
from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from stack import gate_policy as policy
from stack.gate import SECURITY_HEADERS, GateLimits, GateThread
from stack.settings import torchserve_config
from stack.torchserve import TorchServe, free_port
from stress import bombs
from tests.test_gate import assert_one_json_refusal, exchange, responses

REPO = Path(__file__).resolve().parents[1]
NAME = "skin-lesion"
API = f"/predictions/{NAME}"
CONF = (REPO / "docker" / "nginx.conf").read_text()
MAIN = (REPO / "docker" / "nginx-front.conf").read_text()
LISTEN = {"front": (REPO / "docker" / "nginx-listen-front.conf").read_text(),
          "plain": (REPO / "docker" / "nginx-listen.conf").read_text()}
VENV_NGINX = REPO / ".venv" / "nginx"
TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str:
    found = VENV_NGINX / "usr" / "sbin" / "nginx"
    if not os.access(found, os.X_OK) or not (VENV_NGINX / "usr/lib/nginx/modules/ngx_stream_module.so").exists():
        pytest.fail("nginx and its stream module are needed (./skin test unpacks Debian's packages into .venv/nginx)")
    return str(found)


def _replace(text: str, pairs) -> str:
    for old, new in pairs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def _site(work: Path, gate_port: int, dist: Path) -> None:
    """docker/nginx.conf with the gate's address and the document root made local."""
    conf = _replace(CONF, (("server gate:8000;", f"server 127.0.0.1:{gate_port};"), ("root /usr/share/nginx/html;", f"root {dist};")))
    (work / "default.conf").write_text(conf)


def local_conf(work: Path, port: int, gate_port: int, dist: Path) -> Path:
    """Compose's site: the TCP front (docker/nginx-front.conf) and docker/nginx.conf behind it, with their
    deployment facts (ports, gate address, document root, the paths of the container's nginx) made local."""
    inner = free_port()
    _site(work, gate_port, dist)
    (work / "skin-listen.conf").write_text(_replace(LISTEN["front"], (("listen 127.0.0.1:8081 proxy_protocol;",
                                                                       f"listen 127.0.0.1:{inner} proxy_protocol;"),)))
    main = _replace(MAIN, (
        ("include /etc/nginx/modules-enabled/*.conf;",
         f"load_module {VENV_NGINX / 'usr/lib/nginx/modules/ngx_stream_module.so'};\ndaemon off;"
         + ("\nuser root;" if os.geteuid() == 0 else "")),
        ("error_log /dev/stderr warn;", f"error_log {work / 'error.log'} warn;"),
        ("pid /tmp/nginx.pid;", f"pid {work / 'nginx.pid'};"),
        ("listen 8080;", f"listen 127.0.0.1:{port};"),
        ("proxy_pass 127.0.0.1:8081;", f"proxy_pass 127.0.0.1:{inner};"),
        ("include /etc/nginx/conf.d/*.conf;", f"include {work / 'default.conf'};"),
        *((f"_temp_path /tmp/nginx_{kind};", f"_temp_path {work / kind};") for kind in TEMPS)))
    (work / "nginx.conf").write_text(main)
    return work / "nginx.conf"


def plain_conf(work: Path, port: int, gate_port: int, dist: Path) -> Path:
    """The image's default main configuration (Kubernetes): docker/nginx.conf alone, listening as
    docker/nginx-listen.conf says, no stream module."""
    _site(work, gate_port, dist)
    (work / "skin-listen.conf").write_text(_replace(LISTEN["plain"], (("listen 8080;", f"listen 127.0.0.1:{port};"),)))
    (work / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {work / 'nginx.pid'};\nerror_log {work / 'error.log'} warn;\n"
        + ("user root;\n" if os.geteuid() == 0 else "")
        + "events { worker_connections 256; }\nhttp {\naccess_log off;\n"
        + "".join(f"{kind}_temp_path {work / kind};\n" for kind in TEMPS) + f"include {work / 'default.conf'};\n}}\n")
    return work / "nginx.conf"


def serve(conf: Path, work: Path, port: int) -> subprocess.Popen:
    """nginx with this configuration, once it accepts connections on `port` (15 s at most)."""
    proc = subprocess.Popen([nginx_binary(), "-c", str(conf), "-p", str(work)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc


@pytest.fixture(scope="module")
def entries(tiny_mar, tiny_release, tmp_path_factory):
    work = tmp_path_factory.mktemp("nginx")
    dist = work / "dist"
    subprocess.run([sys.executable, "-m", "stack.page", "--meta", str(tiny_release / "meta.json"),
                    "--out", str(dist)], cwd=REPO, check=True, capture_output=True)
    ts = TorchServe(tiny_mar.parent, {NAME: tiny_mar.name}, work / "ts", free_port(), free_port(), free_port()).start()
    direct = behind = proc = None
    try:
        ts.wait_ready(min_workers=2)
        direct = GateThread(dist, ts.inference_url, ts.tokens).start()
        behind = GateThread(None, ts.inference_url, ts.tokens, client_ip_header="X-Real-IP").start()
        port = free_port()
        conf = local_conf(work, port, behind.gate.port, dist)
        binary = nginx_binary()
        check = subprocess.run([binary, "-t", "-c", str(conf), "-p", str(work)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        proc = serve(conf, work, port)
        yield {"gate": (direct.url, direct.gate.port), "nginx": (f"http://127.0.0.1:{port}", port)}
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=15)
        for g in (direct, behind):
            if g:
                g.stop()
        ts.stop()


def _directive(name: str) -> str:
    found = re.findall(rf"^\s*{name}\s+([^;]+);", CONF, re.M)
    assert len(set(found)) == 1, (name, found)
    return found[0]


def test_nginx_enforces_the_gates_limits():
    """The limits nginx applies itself are the gate's (GateLimits) and TorchServe's (config.properties)."""
    limits = GateLimits()
    cap = int(torchserve_config("max_request_size"))
    assert limits.max_body == cap
    size = _directive("client_max_body_size")
    assert int(size.rstrip("m")) * 2**20 == cap and f"larger than {cap} bytes" in CONF
    assert _directive("limit_conn perclient") == str(limits.per_client)
    assert _directive("limit_conn everyone") == str(limits.max_connections)
    for zone, cap in (("tcp_address", limits.per_address_connections), ("tcp_network", limits.per_network_connections),
                      ("tcp_total", limits.max_connections)):
        assert re.findall(rf"^\s*limit_conn {zone} (\d+);", MAIN, re.M) == [str(cap)], zone
    assert re.search(rf"zone=rate:10m rate={limits.rate:g}r/s;", CONF), "nginx's request rate is not the gate's"
    assert re.findall(r"limit_req zone=rate burst=(\d+) nodelay;", CONF) == [str(limits.burst)]
    for name in ("client_header_timeout", "keepalive_timeout"):
        assert _directive(name) == f"{limits.idle_s:.0f}s", name
    api = re.search(r"location ~ \^(\S+)\$ \{", CONF).group(1)
    assert api == policy.API_PATH.pattern, "nginx's API location and the gate's API_PATH differ"
    for header, value in SECURITY_HEADERS.items():
        if header != "Server":
            assert f'add_header {header} "{value}" always;' in CONF or f"add_header {header} {value} always;" in CONF, header


def _cases(jpeg: bytes) -> dict:
    body, multipart_ct = bombs.multipart_part_bomb()
    return {
        "image": dict(data=jpeg),
        "image as form (curl --data-binary)": dict(data=jpeg, headers={"Content-Type": "application/x-www-form-urlencoded"}),
        "multipart": dict(files={"data": ("x.jpg", jpeg, "image/jpeg")}),
        "json": dict(json={"data": base64.b64encode(jpeg).decode()}),
        "form field bomb": dict(data=bombs.form_field_bomb(), headers={"Content-Type": "application/x-www-form-urlencoded"}),
        "multipart part bomb": dict(data=body, headers={"Content-Type": multipart_ct}),
        "nested json": dict(data=b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"}),
        "text": dict(data=b"hello", headers={"Content-Type": "text/plain"}),
        "oversize": dict(data=b"\0" * (11 * 2**20)),
    }


def test_policy_cases_get_the_same_answer(entries, sample_images):
    jpeg = sample_images[0].read_bytes()
    for name, kw in _cases(jpeg).items():
        got = {}
        for entry, (url, _) in entries.items():
            r = requests.post(url + API, timeout=60, **kw)
            got[entry] = (r.status_code, r.json().get("error") if r.status_code != 200 else r.json()["top"])
            assert r.headers["X-Content-Type-Options"] == "nosniff", (entry, name)
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], (entry, name)
        assert got["gate"] == got["nginx"], (name, got)


@pytest.mark.parametrize("method,path", [("GET", API), ("DELETE", API), ("GET", "/nope"), ("GET", "/models"),
                                         ("POST", "/models"), ("PUT", "/"), ("GET", "/"), ("GET", "/app.js"),
                                         ("POST", "/ping"), ("GET", "/ping"), ("PROPFIND", "/"), ("OPTIONS", API)])
def test_routes_get_the_same_status(entries, method, path):
    got = {entry: requests.request(method, url + path, timeout=30).status_code for entry, (url, _) in entries.items()}
    assert got["gate"] == got["nginx"], got


POST = f"POST {API} HTTP/1.1\r\nHost: x\r\n".encode()


@pytest.mark.parametrize("name,raw,status", [
    ("chunked", POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
    ("no length", POST + b"Connection: close\r\n\r\n", 411),
    ("negative length", POST + b"Content-Length: -1\r\n\r\n", 400),
    ("non-numeric length", POST + b"Content-Length: 12abc\r\n\r\n", 400),
    ("duplicate length", POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("length and chunked", POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("line too long", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("header too large", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 400),
])
def test_framing_attacks_get_one_json_refusal_from_both(entries, name, raw, status):
    for entry, (_, port) in entries.items():
        body = assert_one_json_refusal(exchange(port, raw, first_only=True), status)
        assert re.fullmatch(r"[a-z_]+", body["error"]), (entry, body)


def test_a_per_client_cap_on_both(entries, sample_images):
    """Four uploads in flight from one address: the fifth is refused 429 by both, another address is served."""
    for entry, (url, port) in entries.items():
        held = []
        try:
            for _ in range(4):
                s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.5", 0))
                s.sendall(POST + b"Content-Length: 100000\r\n\r\n" + b"\0" * 10)
                held.append(s)
            time.sleep(0.5)
            raw = exchange(port, POST + b"Content-Length: 3\r\n\r\nabc", source="127.0.0.5", first_only=True)
            got = responses(raw)
            assert got and got[0][0] == 429 and got[0][2]["error"] == "too_many_requests", (entry, raw[:300])
            assert got[0][1].get("retry-after"), entry
            r = requests.post(url + API, data=sample_images[1].read_bytes(), timeout=30)
            assert r.status_code == 200, (entry, r.text)
        finally:
            for s in held:
                s.close()


def _open_and_silent(sock: socket.socket) -> bool:
    """The server still holds this connection open without having answered on it."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # an answer, or the end: not held
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def test_unfinished_heads_from_one_address_shut_nobody_out(entries, sample_images):
    """One address opens 150 connections and sends half a request head on each: both entries keep at most the
    address's share open (GateLimits.per_address_connections; nginx's http limit_conn only counts a connection
    once its head is read, so this is the stream front's cap), another address is still served, and both
    close the unfinished heads after the header timeout (GateLimits.idle_s = nginx's client_header_timeout)."""
    image = sample_images[1].read_bytes()
    held = {entry: [] for entry in entries}
    try:
        for entry, (_, port) in entries.items():
            for _ in range(150):
                try:
                    s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.9", 0), timeout=5)
                    s.sendall(b"POST " + API.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Le")
                    held[entry].append(s)
                except OSError:
                    pass  # the gate refuses an address's 65th connection at once
        time.sleep(1.0)
        for entry, socks in held.items():
            still_open = sum(_open_and_silent(s) for s in socks)
            assert 0 < still_open <= GateLimits().per_address_connections, (entry, still_open)
        t0 = time.monotonic()
        for entry, (url, _) in entries.items():
            r = requests.post(url + API, data=image, timeout=30)
            assert r.status_code == 200, (entry, r.text)
        for entry, socks in held.items():
            assert socks, entry
            for s in socks:
                s.settimeout(max(1.0, GateLimits().idle_s + 10 - (time.monotonic() - t0)))
                try:
                    data = s.recv(4096)
                except socket.timeout:
                    pytest.fail(f"{entry}: an unfinished head was still open after the header timeout")
                except OSError:
                    data = b""
                assert data == b"" or data.startswith((b"HTTP/1.1 4", b"HTTP/1.1 503")), (entry, data[:100])
    finally:
        for socks in held.values():
            for s in socks:
                s.close()


def test_the_images_default_configuration_serves_without_the_front(tiny_release, tmp_path):
    """Kubernetes runs the site image with its default main configuration (read-only root, no stream module):
    docker/nginx.conf then listens on the port docker/nginx-listen.conf gives and serves the page by itself."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "stack.page", "--meta", str(tiny_release / "meta.json"), "--out", str(dist)],
                   cwd=REPO, check=True, capture_output=True)
    port = free_port()
    conf = plain_conf(tmp_path, port, free_port(), dist)
    check = subprocess.run([nginx_binary(), "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = serve(conf, tmp_path, port)
    try:
        r = requests.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert r.status_code == 200 and "<html" in r.text.lower() and r.headers["X-Frame-Options"] == "DENY"
        assert requests.delete(f"http://127.0.0.1:{port}/", timeout=10).status_code == 405
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_k8s_page_takes_the_client_address_only_from_the_ingress_controller(tmp_path):
    """deploy/k8s/page.yaml's real-IP settings in a real nginx, this test's loopback added as the controller: a
    client cannot choose its address (and so a fresh per-client bucket) by writing X-Forwarded-For entries of
    its own, LAN addresses included; the address is the last entry, the one the controller appended."""
    import yaml

    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "page.yaml").read_text()))
    real_ip = next(d for d in docs if d and d.get("metadata", {}).get("name") == "page-real-ip")["data"]["real-ip.conf"]
    port = free_port()
    server = real_ip + "set_real_ip_from 127.0.0.1;\n"
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'} warn;\n"
        + ("user root;\n" if os.geteuid() == 0 else "")
        + "events { worker_connections 64; }\nhttp {\naccess_log off;\n"
        + "".join(f"{kind}_temp_path {tmp_path / kind};\n" for kind in TEMPS)
        + f"server {{ listen 127.0.0.1:{port};\n{server}\nlocation / {{ return 200 $remote_addr; }} }}\n}}\n")
    proc = serve(tmp_path / "nginx.conf", tmp_path, port)
    try:
        seen = lambda xff: requests.get(f"http://127.0.0.1:{port}/", headers={"X-Forwarded-For": xff},  # noqa: E731
                                        timeout=10).text
        assert seen("198.51.100.7") == "198.51.100.7"  # the controller's entry
        for forged in ("10.9.9.9, 192.168.1.20", "203.0.113.5, 10.0.0.8, 192.168.1.20", "172.16.4.4,192.168.1.20",
                       "10.244.3.3, 192.168.1.20"):
            assert seen(forged) == "192.168.1.20", forged  # whatever the client wrote before it
    finally:
        proc.terminate()
        proc.wait(timeout=15)
