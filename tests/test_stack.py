"""`./skin up` as a user runs it: builds the archive, waits for real readiness, answers, stops cleanly."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import requests

from stack.torchserve import free_port

REPO = Path(__file__).resolve().parents[1]


def _start(tiny_release, tmp_path, port):
    env = {**os.environ, "SKIN_RELEASE_DIR": str(tiny_release), "SKIN_MODEL_STORE": str(tmp_path / "store"),
           "SKIN_INFERENCE_PORT": str(port), "SKIN_MANAGEMENT_PORT": str(free_port()),
           "SKIN_METRICS_PORT": str(free_port()), "SKIN_STATE_DIR": str(tmp_path / "state"),
           "SKIN_SITE_PORT": str(free_port())}
    proc = subprocess.Popen([str(REPO / "skin"), "up"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C" in line:
            return proc, env, lines
    proc.kill()
    raise AssertionError("stack did not become ready:\n" + "".join(lines))


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_up_serves_and_ctrl_c_stops_everything(tiny_release, tmp_path, sample_images):
    port = free_port()
    proc, _env, lines = _start(tiny_release, tmp_path, port)
    children = _descendants(proc.pid)
    try:
        assert any("READY" in line for line in lines)
        assert (tmp_path / "store" / "skin-lesion.mar").exists(), "the archive was not built"
        r = requests.put(f"http://127.0.0.1:{port}/predictions/skin-lesion", data=sample_images[0].read_bytes(),
                         timeout=30)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 7
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped" in out
    time.sleep(0.5)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"


def test_down_stops_a_running_stack(tiny_release, tmp_path):
    proc, env, _ = _start(tiny_release, tmp_path, free_port())
    children = _descendants(proc.pid)
    r = subprocess.run([str(REPO / "skin"), "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and "stopped" in r.stdout
    proc.wait(timeout=30)
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    r = subprocess.run([str(REPO / "skin"), "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "not running" in r.stdout
