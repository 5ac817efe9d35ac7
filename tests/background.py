"""Long subprocess work that some tests only check the results of, started in the background as the run is collected.

Three jobs took half of a full run's time while using little of what the other tests use: the compose tier's images
(docker/offline-images.sh and `compose build`: disk and package work), the accelerator script's quick study and the
quick study end to end (training on the CPU). Most other tests wait on servers and leave the CPU idle (measured:
test_attacks.py leaves it 67 % idle). So conftest starts the jobs the run's selection needs when collection ends,
niced so that foreground tests keep the CPU: the two studies one after the other (together they would run 4
threads on 2 cores, slower than in turn), the images beside them. The tests that read a job's result run after
every other test, job by job; their fixture waits for the job (`result`) and fails with its log's tail if it
failed. A run that ends earlier stops the jobs and removes their folders.
"""
from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
COMPOSE_PROJECT = "skin-compose-test"  # not the users' project name (skin-lesion): a test never touches their stack


class Unavailable(RuntimeError):
    """What a job needs is not here (no Docker engine, no Compose CLI, no HAM10000): its tests fail with this."""


def compose_cli() -> list[str]:
    """SKIN_COMPOSE (e.g. 'docker-compose'), else Compose v2 (`docker compose`) if present, else v1."""
    if os.environ.get("SKIN_COMPOSE"):
        return os.environ["SKIN_COMPOSE"].split()
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise Unavailable("no Compose CLI: ./skin test --compose installs Debian's docker-compose")


def _ham10000() -> str:
    from stack.settings import ham10000_dir

    root = ham10000_dir()
    if root is None or not (root / "HAM10000_metadata.csv").exists():
        raise Unavailable("HAM10000 not found: set HAM10000_DIR or put it at ../shared/data/ham10000")
    return str(root)


def compose_images(folder: Path) -> list[str]:
    """compose.env with this run's secrets, then the local base images (unless SKIN_COMPOSE_PUBLIC_IMAGES; their
    variables are added to compose.env), then `compose build`; each step's seconds go to the log."""
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        raise Unavailable("no Docker engine answers: ./skin test --compose installs docker.io and starts dockerd")
    cli = compose_cli()
    env_file = folder / "compose.env"
    values = {"POSTGRES_USER": "skin", "POSTGRES_DB": "skin", "POSTGRES_PASSWORD": secrets.token_hex(12),
              "MINIO_ROOT_USER": "skin-admin", "MINIO_ROOT_PASSWORD": secrets.token_hex(12), "SKIN_S3_BUCKET": "models"}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    (folder / "compose.cli").write_text(" ".join(cli))
    compose = " ".join(map(shlex.quote, [*cli, "-p", COMPOSE_PROJECT, "--env-file", str(env_file)]))
    offline = "" if os.environ.get("SKIN_COMPOSE_PUBLIC_IMAGES") else (
        't=$SECONDS; docker/offline-images.sh; echo "./skin images --offline: $((SECONDS - t)) s"\n'
        f"cat .stack/compose-offline.env >> {shlex.quote(str(env_file))}\n")
    script = ("set -euo pipefail\n" + offline +
              f"{compose} down -v --remove-orphans >/dev/null 2>&1 || true  # what an interrupted run left\n"
              f't=$SECONDS; {compose} build; echo "compose build: $((SECONDS - t)) s"\n')
    return ["bash", "-c", script]


def accelerator_study(folder: Path) -> list[str]:
    """training/accelerator.sh --quick on the CPU: the whole study in a 120 s budget, packed into folder/out."""
    return ["env", f"OUT={folder / 'out'}", f"PYTHON={sys.executable}", "OMP_NUM_THREADS=2",
            "bash", "training/accelerator.sh", "--quick", "--teacher-tta", "--recipe-search", "--data", _ham10000(),
            "--work", str(folder / "study"), "--budget", "120", "--after-training", "60"]


def quick_study(folder: Path) -> list[str]:
    """python -m training all --quick --grid, without a ResNet50 (as release 2.0 was trained), into folder/study."""
    return ["env", "OMP_NUM_THREADS=2", sys.executable, "-m", "training", "all", "--quick", "--grid",
            "--epochs-resnet50", "0", "--out", str(folder / "study"), "--cache-dir", str(folder / "cache"),
            "--data", _ham10000()]


@dataclass(frozen=True)
class Job:
    name: str
    needed_by: str  # the node id (or its prefix) of the tests that read the job's result
    command: Callable[[Path], list[str]]  # the command, given the job's own folder; may raise Unavailable
    lane: str  # jobs of one lane run one after another: the two studies would otherwise share 2 cores 4 threads
    limit_s: int  # the job is stopped past this (`timeout`), and its tests fail saying so


# In the order their tests run, at the end of the run: the compose images, which take longest, last.
JOBS = (Job("quick study", "tests/test_training_cli.py::test_quick_study_end_to_end", quick_study, "cpu", 900),
        Job("accelerator study", "tests/test_accelerator_script.py", accelerator_study, "cpu", 900),
        Job("compose images", "tests/test_compose_up.py", compose_images, "docker", 1800))


def _lower_priority() -> None:
    os.nice(10)


class Lane:
    """Jobs run one after another by one bash process (its own process group, niced: `docker build`'s steps run in
    dockerd, at its priority). Each job has its own folder with its log; it writes `started` when it starts and its
    exit status to `rc` when it ends (124: past its limit). A watcher in the lane stops it and removes its folders
    if this test process dies without stopping it (SIGKILL, a CI timeout)."""

    def __init__(self, jobs: list[Job]):
        self.folders: dict[str, Path] = {}
        self.jobs = {job.name: job for job in jobs}
        steps = []
        for job in jobs:
            folder = Path(tempfile.mkdtemp(prefix=f"skin-{job.name.replace(' ', '-')}-"))
            self.folders[job.name] = folder
            try:
                command = shlex.join(["timeout", "-k", "30", str(job.limit_s), *job.command(folder)])
            except Unavailable as err:
                (folder / "unavailable").write_text(str(err))
                continue
            q = {name: shlex.quote(str(folder / name)) for name in ("started", "job.log", "rc")}
            steps.append(f"touch {q['started']}; {command} > {q['job.log']} 2>&1 < /dev/null; "
                         f"echo $? > {q['rc']}.tmp && mv {q['rc']}.tmp {q['rc']}")
        folders = " ".join(shlex.quote(str(f)) for f in self.folders.values())
        watcher = (f"(while kill -0 {os.getpid()} 2>/dev/null; do sleep 5; done; rm -rf {folders}; kill -TERM 0) "
                   "</dev/null >/dev/null 2>&1 &")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(["bash", "-c", "\n".join([watcher, *steps])], cwd=REPO, start_new_session=True,
                                     stdin=subprocess.DEVNULL, preexec_fn=_lower_priority)

    def wait(self, name: str) -> Path:
        """The job's folder once it has succeeded. Raises Unavailable, or RuntimeError with the log's tail if the
        job failed, passed its limit, or its lane stopped first (each job has a limit, so the wait ends)."""
        folder, waited, job = self.folders[name], time.monotonic(), self.jobs[name]
        if (folder / "unavailable").exists():
            raise Unavailable((folder / "unavailable").read_text())
        while not (folder / "rc").exists() and self.proc.poll() is None:
            time.sleep(1)
        if (folder / "rc").exists():
            rc = (folder / "rc").read_text().strip()
            why = f"stopped past its limit of {job.limit_s} s" if rc in ("124", "137") else f"exit status {rc}"
        else:
            rc, why = None, (f"its lane ended (status {self.proc.returncode}) before it did" if
                             (folder / "started").exists() else "its lane ended before it started")
        if rc != "0":
            log = folder / "job.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            (folder / "keep").touch()  # the whole log stays for reading after the run
            raise RuntimeError(f"the background job '{name}' failed: {why}; log {log}:\n{text[-4000:]}")
        print(f"{name}: done in the background; this run waited {time.monotonic() - waited:.0f} s for it")
        return folder

    def stop(self) -> None:
        """The lane's process group stopped (its watcher too), and its folders removed but those of failed jobs."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for folder in self.folders.values():
            if not (folder / "keep").exists():
                shutil.rmtree(folder, ignore_errors=True)


_lanes: dict[str, Lane] = {}  # job name -> the lane running it


def needs(job: Job, nodeid: str) -> bool:
    tail = "::" if job.needed_by.endswith(".py") else "["
    return nodeid == job.needed_by or nodeid.startswith(job.needed_by + tail)


def order(items) -> None:
    """Tests that read a job's result after all others, job by job in JOBS' order (a stable sort)."""
    items.sort(key=lambda item: next((i + 1 for i, job in enumerate(JOBS) if needs(job, item.nodeid)), 0))


def start(jobs: list[Job]) -> None:
    """One lane per lane name for the jobs not started yet, in JOBS' order."""
    todo = [job for job in JOBS if job in jobs and job.name not in _lanes]
    for lane_name in dict.fromkeys(job.lane for job in todo):
        lane = Lane([job for job in todo if job.lane == lane_name])
        _lanes.update({name: lane for name in lane.folders})


def start_for(items) -> None:
    """Starts every job a test among `items` reads."""
    start([job for job in JOBS if any(needs(job, item.nodeid) for item in items)])


def result(name: str) -> Path:
    """The job's folder once it has succeeded (started now if the run did not start it); the calling test fails
    with the reason (Unavailable, or the job's failure and its log's tail) otherwise."""
    import pytest

    start([job for job in JOBS if job.name == name])
    try:
        return _lanes[name].wait(name)
    except RuntimeError as err:  # Unavailable included
        pytest.fail(str(err))


def stop_all() -> None:
    """At the run's end: every lane stopped, its folders (logs, the compose secrets) removed but failed jobs'."""
    for lane in set(_lanes.values()):
        lane.stop()
    _lanes.clear()
