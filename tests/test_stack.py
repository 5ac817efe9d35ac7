"""`./skin up` as a user runs it: builds the archive, waits for real readiness, answers through the page,
restarts what dies instead of tearing down, keeps its files private, stops cleanly."""
from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from stress.local_stack import LocalStack

REPO = Path(__file__).resolve().parents[1]
API = "/predictions/skin-lesion"


@pytest.fixture
def stack(tiny_release, tmp_path):
    s = LocalStack(tiny_release, tmp_path).start()
    yield s
    s.stop()


def test_up_serves_through_the_page_and_ctrl_c_stops_everything(stack, tmp_path, sample_images):
    children = stack.processes()
    assert any("READY" in line for line in stack.lines)
    assert f"curl -T lesion.jpg {stack.page_url}{API}" in stack.output(), "the printed URL must go through the page"
    assert (tmp_path / "store" / "skin-lesion.mar").exists(), "the archive was not built"
    r = requests.put(stack.page_url + API, data=sample_images[0].read_bytes(), timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 7
    assert requests.put(stack.inference_url + API, data=sample_images[0].read_bytes(), timeout=30).status_code == 400
    assert stack.stop() == 0, stack.output()
    assert "stopped" in stack.output()
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"


def test_the_readme_commands_and_fields_are_true(stack, sample_images, tmp_path):
    """Every curl line of the README that talks to the page runs as written (only the address and the image
    file swapped), and the API example names exactly the fields a real answer has."""
    import json
    import re
    import shlex
    import shutil

    readme = (REPO / "README.md").read_text()
    lines = {m.group(0).rstrip("`").strip() for m in re.finditer(r"curl [^\n`]*http://127\.0\.0\.1:8000/[^\n`]*", readme)}
    assert any("/predictions/" in ln for ln in lines) and any("/explanations/" in ln for ln in lines), lines
    shutil.copy(sample_images[0], tmp_path / "lesion.jpg")
    answers = []
    for line in sorted(lines):
        cmd = shlex.split(line.replace("http://127.0.0.1:8000", stack.page_url))
        r = subprocess.run([cmd[0], "-s", "-w", "\n%{http_code}", *cmd[1:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
        body, _, code = r.stdout.rpartition("\n")
        assert code == "200", (line, code, body[:300])
        answers.append(json.loads(body))
    example = readme[readme.index("```json", readme.index("## API")):]
    example = example[:example.index("```", 7)]
    documented = set(re.findall(r'"([a-z_]+)":', example))
    prediction = next(a for a in answers if "explanation" not in a)
    top_level = {"top", "verdict", "verdict_reason", "predictions", "concern", "model", "request_id", "notice"}
    assert set(prediction) == top_level <= documented
    committed = json.loads((REPO / "release" / "meta.json").read_text())["version"]  # this stack serves a tiny model
    assert f'"version": "{committed}"' in example, "the example names another version than the committed release"
    explained = next(a for a in answers if "explanation" in a)
    assert set(explained["explanation"]) == {"method", "class", "image_png_base64", "model_input_box"}
    assert all(f'"{k}"' in readme for k in explained["explanation"]), "the README does not name every explanation field"


def test_dead_children_are_restarted_while_the_page_answers(stack, sample_images):
    image = sample_images[0].read_bytes()
    jvm = stack.find("org.pytorch.serve.ModelServer")
    jvm.kill()
    statuses, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        r = requests.post(stack.page_url + API, data=image, timeout=60)
        statuses.append(r.status_code)
        if r.status_code == 503:
            assert r.json()["error"] in ("unavailable", "busy") and int(r.headers["Retry-After"]) >= 1
        elif r.status_code == 200 and len(statuses) > 1:
            break
        else:
            assert r.status_code == 200, r.text
        time.sleep(0.2)
    assert 503 in statuses and statuses[-1] == 200 and stack.running(), (statuses, stack.output())
    assert "TorchServe exited" in stack.output() and "TorchServe restarted" in stack.output()
    new_jvm = stack.find("org.pytorch.serve.ModelServer")
    assert new_jvm is not None and new_jvm.pid != jvm.pid
    for marker, name in (("stack.gate", "the page's gate"), ("-m logger", "the logger sidecar")):
        before = stack.find(marker)
        before.kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not ((p := stack.find(marker)) and p.pid != before.pid):
            time.sleep(0.2)
        assert p is not None and p.pid != before.pid, f"{name} was not restarted:\n{stack.output()}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.post(stack.page_url + API, data=image, timeout=30).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    else:
        raise AssertionError("the page did not come back after its gate was restarted")


def test_state_is_private_to_its_owner(stack):
    for root, dirs, files in os.walk(stack.state):
        assert stat.S_IMODE(os.stat(root).st_mode) & 0o077 == 0, root
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path
    assert (stack.state / "data" / "predictions.sqlite3").exists() and stack.tokens.path.exists()


def test_down_stops_a_running_stack(tiny_release, tmp_path):
    s = LocalStack(tiny_release, tmp_path).start()
    children = s.processes()
    r = subprocess.run([str(REPO / "skin"), "down"], cwd=REPO, env=s.env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and "stopped" in r.stdout
    s.proc.wait(timeout=30)
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    r = subprocess.run([str(REPO / "skin"), "down"], cwd=REPO, env=s.env, capture_output=True, text=True, timeout=60)
    assert "not running" in r.stdout
