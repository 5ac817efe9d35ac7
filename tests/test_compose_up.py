"""docker-compose.yml brought up for real (./skin test --compose): a Docker engine, the images built (cached) from
the local base images of `./skin images --offline` (in the background while the other tests run:
tests/background.py), every health check waited for, then everything through the page's port, published on
127.0.0.1 only. The tests share one stack, run in this file's order and after every other file's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from stack.settings import MODEL_NAME
from stack.torchserve import free_port
from tests import background
from tests.background import COMPOSE_PROJECT as PROJECT

REPO = Path(__file__).resolve().parents[1]
LONG_RUNNING = ("torchserve", "logger", "postgres", "gate", "site", "minio")
BUILT = ("torchserve", "logger", "gate")  # images of ours that must not run as root


class Stack:
    def __init__(self, cli: list[str], env_file: Path, port: int):
        self.cli, self.env_file, self.port = cli, env_file, port
        self.url = f"http://127.0.0.1:{port}"
        self.answered: list[str] = []  # request ids of every answer a client of these tests got
        self.secrets = dict(line.split("=", 1) for line in env_file.read_text().split())

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.cli, "-p", PROJECT, "--env-file", str(self.env_file), *args], cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            pytest.fail(f"{' '.join(self.cli)} {' '.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        return r

    def ids(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def containers(self) -> list[dict]:
        ids = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").split()
        return json.loads(docker("inspect", *ids)) if ids else []

    def wait_healthy(self, timeout: float = 420) -> None:
        deadline = time.monotonic() + timeout
        while True:
            waiting = []
            for c in self.containers():
                service = c["Config"]["Labels"]["com.docker.compose.service"]
                state = c["State"]
                if service == "minio-init":
                    if state["Status"] != "exited" or state["ExitCode"] != 0:
                        waiting.append(f"{service}: {state['Status']} {state.get('ExitCode')}")
                elif state.get("Health", {}).get("Status") != "healthy":
                    waiting.append(f"{service}: {state['Status']} {state.get('Health', {}).get('Status')}")
            if not waiting:
                return
            if time.monotonic() > deadline:
                logs = self.compose("logs", "--tail", "30", check=False).stdout[-6000:]
                pytest.fail(f"not healthy after {timeout:.0f} s: {waiting}\n{logs}")
            time.sleep(2)

    def post(self, image: bytes, kind: str = "predictions") -> requests.Response:
        r = requests.post(f"{self.url}/{kind}/{MODEL_NAME}", data=image, timeout=60,
                          headers={"Content-Type": "application/octet-stream"})
        if r.status_code == 200:
            self.answered.append(r.json()["request_id"])
        return r

    def sql(self, query: str) -> list[str]:
        user, db = self.secrets["POSTGRES_USER"], self.secrets["POSTGRES_DB"]
        out = docker("exec", self.ids("postgres")[0], "psql", "-U", user, "-d", db, "-At", "-c", query)
        return out.split()

    def audited(self, timeout: float = 60) -> set[str]:
        """The request ids in PostgreSQL once every answer given so far is there (or what is there at timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.sql("SELECT request_id FROM predictions")
            if set(self.answered) <= set(rows) or time.monotonic() > deadline:
                assert len(rows) == len(set(rows))
                return set(rows)
            time.sleep(1)


def docker(*args: str, timeout: float = 120) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"docker {' '.join(args)}: {r.stderr[-2000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def stack():
    """The images come from the run's background job (tests/background.py); then up, and every health check."""
    folder = background.result("compose images")
    port = free_port()  # drawn now, not when the build started: minutes of other tests could have taken it
    env_file = folder / "compose.env"
    with open(env_file, "a") as f:
        f.write(f"SKIN_SITE_PORT={port}\n")
    s = Stack((folder / "compose.cli").read_text().split(), env_file, port)
    started = time.monotonic()
    try:  # down -v also when the stack never became healthy
        s.compose("up", "-d")
        s.wait_healthy()
        print(f"compose up + healthy: {time.monotonic() - started:.0f} s")
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans", check=False)


@pytest.fixture(scope="module")
def images(sample_images) -> list[bytes]:
    return [p.read_bytes() for p in sample_images[:6]]


class Client(threading.Thread):
    """Posts the images in turn, one request at a time and at most one per INTERVAL seconds (a person's pace, under
    the gate's per-client rate limit even with several clients on one address), until stopped; keeps every status
    and version."""

    INTERVAL = 0.15

    def __init__(self, stack: Stack, images: list[bytes]):
        super().__init__(daemon=True)
        self.stack, self.images, self.stop = stack, images, threading.Event()
        self.results: list[tuple[int, str | None]] = []

    def run(self):
        i = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                r = self.stack.post(self.images[i % len(self.images)])
                self.results.append((r.status_code, r.json().get("model", {}).get("version")))
            except (requests.RequestException, ValueError) as exc:
                self.results.append((0, repr(exc)))
            i += 1
            self.stop.wait(max(0.0, self.INTERVAL - (time.monotonic() - started)))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *_exc):
        self.stop.set()
        self.join(90)


def test_every_service_is_healthy_non_root_and_only_the_page_is_published_on_loopback(stack):
    by_service = {}
    for c in stack.containers():
        by_service.setdefault(c["Config"]["Labels"]["com.docker.compose.service"], []).append(c)
    for service in LONG_RUNNING:
        (c,) = by_service[service]
        assert c["State"]["Health"]["Status"] == "healthy", service  # a health check exists and passes
        assert c["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped", service
        bindings = {k: v for k, v in (c["HostConfig"]["PortBindings"] or {}).items() if v}
        published = [b for bs in (c["NetworkSettings"]["Ports"] or {}).values() if bs for b in bs]
        if service == "site":
            assert list(bindings) == ["8080/tcp"] and {b["HostIp"] for b in published} == {"127.0.0.1"}, published
        else:
            assert not bindings and not published, f"{service} publishes {published}"
        networks = set(c["NetworkSettings"]["Networks"])
        assert networks == ({f"{PROJECT}_frontend", f"{PROJECT}_backend"} if service == "site"
                            else {f"{PROJECT}_backend"}), (service, networks)
    for service in BUILT:
        uid = docker("exec", by_service[service][0]["Id"], "id", "-u").strip()
        assert uid != "0", f"{service} runs as root"
    assert docker("network", "inspect", "-f", "{{.Internal}}", f"{PROJECT}_backend").strip() == "true"
    vols = {m["Name"] for c in stack.containers() for m in c["Mounts"] if m["Type"] == "volume"}
    assert {f"{PROJECT}_{v}" for v in ("spool", "pgdata", "minio")} <= vols


def test_the_page_renders_through_the_published_port(stack):
    r = requests.get(stack.url + "/", timeout=10)
    assert r.status_code == 200 and "<html" in r.text.lower() and r.headers["X-Frame-Options"] == "DENY"
    version = json.loads((REPO / "release" / "meta.json").read_text())["version"]
    assert f"<title>Skin-lesion classifier · {MODEL_NAME} {version}</title>" in r.text  # rendered from meta.json
    script = requests.get(stack.url + "/app.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]


def test_real_lesion_photos_get_predictions_and_their_rows_reach_postgresql(stack, images):
    for image in images:
        r = stack.post(image)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["name"] == MODEL_NAME and body["request_id"]
    assert set(stack.answered) <= stack.audited()


def test_an_explanation_works(stack, images):
    r = stack.post(images[0], "explanations")
    assert r.status_code == 200, r.text[:500]
    assert r.json()["request_id"] in stack.audited()


def test_swap_to_a_second_version_from_s3_under_load_then_roll_back(stack, images):
    ts = stack.ids("torchserve")[0]
    docker("exec", ts, "mkdir", "-p", "/tmp/canary")
    for i, image in enumerate(images[:2]):
        (canary := Path(stack.env_file.parent / f"canary{i}.jpg")).write_bytes(image)
        docker("cp", str(canary), f"{ts}:/tmp/canary/{i}.jpg")
    current = json.loads((REPO / "release" / "meta.json").read_text())["version"]
    second = f"{current}.1"
    for version in (current, second):  # the release as built, and a second version of it, into the S3 service
        docker("exec", ts, "python", "-m", "stack", "archive", "--version", version, "--out", f"/tmp/v{version}",
               "--file-name", f"{MODEL_NAME}-{version}.mar", "--publish", timeout=300)
    canary = ["--canary", "/tmp/canary/0.jpg", "/tmp/canary/1.jpg", "--workers", "1"]
    with Client(stack, images) as client:
        time.sleep(3)
        docker("exec", ts, "python", "-m", "ops", "swap", "--to", second, *canary, timeout=300)
        n_swapped = len(client.results)
        time.sleep(4)
        docker("exec", ts, "python", "-m", "ops", "rollback", *canary, timeout=300)
        time.sleep(4)
    statuses = [s for s, _ in client.results]
    versions = [v for _, v in client.results]
    assert statuses and set(statuses) == {200}, [r for r in client.results if r[0] != 200][:5]
    assert second in versions[n_swapped:] and versions[-1] == current, versions
    assert set(stack.answered) <= stack.audited()


@pytest.mark.parametrize("service", ["torchserve", "logger"])
def test_a_crashed_container_is_restarted_by_its_policy_and_no_answer_goes_unaudited(stack, images, service):
    """The container's main process is killed (SIGKILL, as the OOM killer or a crash would): its restart policy
    brings it back. Not `docker kill`: Docker counts that as a deliberate stop, which no restart policy undoes
    (measured on Docker 20.10 for always, unless-stopped and on-failure; test_docker_kill_is_a_deliberate_stop)."""
    (cid,) = stack.ids(service)
    before = json.loads(docker("inspect", cid))[0]
    pid = before["State"]["Pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while json.loads(docker("inspect", cid))[0]["State"]["Pid"] in (pid, 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    after = json.loads(docker("inspect", cid))[0]
    assert after["RestartCount"] > before["RestartCount"], f"{service} was not restarted after it was killed"
    if service == "logger":  # answers given while the logger is down wait in the spool volume
        for image in images[:3]:
            assert stack.post(image).status_code == 200
    stack.wait_healthy()
    for image in images[:3]:
        assert stack.post(image).status_code == 200
    rows = stack.audited(timeout=90)
    assert set(stack.answered) <= rows, f"{len(set(stack.answered) - rows)} answers have no audit row"


def test_two_torchserve_replicas_both_answer_and_audit_into_one_database(stack, images):
    stack.compose("up", "-d", "--no-recreate", "--scale", "torchserve=2")
    stack.wait_healthy()
    replicas = stack.ids("torchserve")
    assert len(replicas) == 2
    counts = {}
    for _ in range(4):  # the gate opens new connections round-robin over the replicas' addresses
        clients = [Client(stack, images) for _ in range(3)]
        for c in clients:
            c.start()
        time.sleep(8)
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(90)
            assert {s for s, _ in c.results} == {200}
        counts = {cid: replica_predictions(cid) for cid in replicas}
        if all(counts.values()):
            break
    assert all(counts.values()), f"predictions per replica: {counts}"
    rows = stack.audited(timeout=90)
    assert set(stack.answered) <= rows, f"{len(set(stack.answered) - rows)} answers have no audit row"


def replica_predictions(cid: str) -> float:
    """Predictions one TorchServe replica has served, from its metrics endpoint (on the container's loopback)."""
    code = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8082/metrics').read().decode())")
    total = 0.0
    for line in docker("exec", cid, "python", "-c", code).splitlines():
        if line.startswith("ts_inference_requests_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_docker_kill_is_a_deliberate_stop(stack):
    """Why the crash test above does not use `docker kill`: Docker restarts no container stopped that way.
    If this fails, the Docker in use restarts killed containers, and the crash test may use `docker kill`."""
    (cid,) = stack.ids("gate")
    docker("kill", cid)
    time.sleep(3)
    state = json.loads(docker("inspect", cid))[0]["State"]
    assert state["Status"] == "exited"
    stack.compose("up", "-d", "--no-recreate")  # what an operator does after a docker kill
    stack.wait_healthy()
    assert requests.get(stack.url + "/ping", timeout=10).status_code == 200


def test_down_v_leaves_nothing(stack):
    stack.compose("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={PROJECT}"
    assert docker("ps", "-aq", "--filter", label).split() == []
    assert docker("volume", "ls", "-q", "--filter", label).split() == []
    assert docker("network", "ls", "-q", "--filter", label).split() == []
