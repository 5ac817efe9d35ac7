"""The compose tier's images (tests/test_compose_up.py), built by one background process per test run.

It starts as soon as the run is collected (conftest.pytest_collection_finish) and conftest orders the compose
stack's tests last, so that the local base images (docker/offline-images.sh) and `compose build`, minutes of
mostly disk and package work, overlap the other tiers' tests instead of adding to them. The stack fixture waits
for it (BackgroundBuild.wait) and fails with the build's log if it failed. A run that ends earlier stops it.
"""
from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = "skin-compose-test"  # not the users' project name (skin-lesion): a test never touches their stack
# The per-run secrets of the test stack: whatever compose interpolates, build included, must be set.
SECRETS = ("POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
           "SKIN_S3_BUCKET")


class ComposeUnavailable(RuntimeError):
    """No Docker engine or no Compose CLI: the compose tier cannot run here."""


def compose_cli() -> list[str]:
    """SKIN_COMPOSE (e.g. 'docker-compose'), else Compose v2 (`docker compose`) if present, else v1."""
    if os.environ.get("SKIN_COMPOSE"):
        return os.environ["SKIN_COMPOSE"].split()
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise ComposeUnavailable("no Compose CLI: ./skin test --compose installs Debian's docker-compose")


def write_env_file(folder: Path) -> Path:
    """compose.env with fresh secrets for this run (the local base images' variables are added by the build)."""
    values = {"POSTGRES_USER": "skin", "POSTGRES_DB": "skin", "POSTGRES_PASSWORD": secrets.token_hex(12),
              "MINIO_ROOT_USER": "skin-admin", "MINIO_ROOT_PASSWORD": secrets.token_hex(12), "SKIN_S3_BUCKET": "models"}
    assert set(values) == set(SECRETS)
    env_file = folder / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return env_file


def _script(cli: list[str], env_file: Path) -> str:
    """The build as one bash script: the local base images unless SKIN_COMPOSE_PUBLIC_IMAGES, then compose build;
    each step's seconds are printed to the log."""
    compose = " ".join(map(shlex.quote, [*cli, "-p", PROJECT, "--env-file", str(env_file)]))
    offline = "" if os.environ.get("SKIN_COMPOSE_PUBLIC_IMAGES") else (
        't=$SECONDS; docker/offline-images.sh; echo "./skin images --offline: $((SECONDS - t)) s"\n'
        f"cat .stack/compose-offline.env >> {shlex.quote(str(env_file))}\n")
    return ("set -euo pipefail\n" + offline +
            f"{compose} down -v --remove-orphans >/dev/null 2>&1 || true  # what an interrupted earlier run left\n"
            f't=$SECONDS; {compose} build; echo "compose build: $((SECONDS - t)) s"\n')


class BackgroundBuild:
    """One run of _script in its own process group, its output in a log file."""

    def __init__(self, folder: Path):
        if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
            raise ComposeUnavailable("no Docker engine answers: ./skin test --compose installs docker.io and starts "
                                     "dockerd")
        self.cli, self.folder = compose_cli(), folder
        self.env_file = write_env_file(folder)
        self.log = folder / "build.log"
        self.started = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", _script(self.cli, self.env_file)], cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, timeout: float = 1800) -> str:
        """Blocks until the build ends; -> its log. Raises RuntimeError with the log's tail if it failed."""
        waited = time.monotonic()
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout - (waited - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            rc = "timed out"
        text = self.log.read_text(errors="replace")
        if rc != 0:
            raise RuntimeError(f"building the compose images failed ({rc}):\n{text[-4000:]}")
        return (f"{text.strip()}\nbuilt in the background in {time.monotonic() - self.started:.0f} s, of which this "
                f"run waited {time.monotonic() - waited:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=60)


_started: BackgroundBuild | ComposeUnavailable | None = None


def start() -> None:
    """Starts the build once per run (a failure to start is kept for the fixture to report)."""
    global _started
    if _started is None:
        folder = Path(tempfile.mkdtemp(prefix="skin-compose-"))
        try:
            _started = BackgroundBuild(folder)
        except ComposeUnavailable as err:
            _started = err


def started() -> BackgroundBuild:
    """The run's build (started now if conftest did not); raises ComposeUnavailable where it cannot run."""
    start()
    if isinstance(_started, ComposeUnavailable):
        raise _started
    return _started


def stop() -> None:
    """At the run's end: the build stopped if it still runs, its folder (the run's secrets, the log) removed."""
    if isinstance(_started, BackgroundBuild):
        _started.stop()
        shutil.rmtree(_started.folder, ignore_errors=True)
