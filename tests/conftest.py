"""Shared fixtures: the real HAM10000 folder, a tiny model trained on it, a .mar built from it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stack.settings import ham10000_dir  # noqa: E402


SLOW_FIXTURES = {"data_dir", "sample_images", "tiny_release", "tiny_mar", "pg_url", "browser", "served", "ts", "server",
                 "stack", "entries", "figures", "s3", "published", "serving_v1"}


@pytest.fixture(autouse=True)
def _fast_tests_stay_fast(request, monkeypatch):
    """A test marked fast may not need HAM10000, Java (TorchServe), PostgreSQL or a browser: not through a
    fixture, and not by calling for them directly either."""
    if not request.node.get_closest_marker("fast"):
        return
    needed = SLOW_FIXTURES & set(request.fixturenames)
    if needed:
        pytest.fail(f"a fast test uses {', '.join(sorted(needed))}: move it out of the fast tier")

    def refuse(*_args, **_kw):
        pytest.fail("a fast test reached for HAM10000, TorchServe or PostgreSQL: move it out of the fast tier")

    import psycopg2

    import stack.settings
    import stack.torchserve
    import training.common.data

    locate = stack.settings.ham10000_dir

    def no_dataset():  # asking where it is may be the test's point; getting a real folder back is not allowed
        found = locate()
        return refuse() if found is not None and found.is_dir() else found

    for target, name, replacement in ((stack.settings, "ham10000_dir", no_dataset),
                                      (training.common.data, "ham10000_dir", no_dataset),
                                      (stack.torchserve.TorchServe, "start", refuse), (psycopg2, "connect", refuse)):
        monkeypatch.setattr(target, name, replacement)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = ham10000_dir()
    if root is None or not (root / "HAM10000_metadata.csv").exists():
        pytest.fail("HAM10000 not found: set HAM10000_DIR or put it at ../shared/data/ham10000")
    return root


@pytest.fixture(scope="session")
def sample_images(data_dir) -> list[Path]:
    import csv

    rows = list(csv.DictReader(open(data_dir / "HAM10000_metadata.csv")))
    by_class = {}
    for r in sorted(rows, key=lambda r: r["image_id"]):
        by_class.setdefault(r["dx"], r["image_id"])
    return [next(data_dir.rglob(f"{i}.jpg")) for i in by_class.values()]


def interruptible_child() -> None:
    """preexec_fn of a child that a test interrupts with SIGINT as a user's Ctrl-C would. SIGINT goes back to its
    default: a test run started in the background of a non-interactive shell (`./skin test &`, nohup) inherits it
    ignored, and a Python child would then never see the signal and run to its end. Niced, so that on a loaded
    machine the child is what waits, not the test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.nice(19)


def run_training(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory, data_dir) -> Path:
    """A real (if weak) model: one epoch on 8 images per class at 32 px, exported like the release."""
    work = tmp_path_factory.mktemp("tiny")
    r = run_training("train", "--arch", "resnet18", "--out", str(work / "run"), "--epochs", "1", "--img-size", "32",
                     "--limit-per-class", "8", "--batch-size", "8", "--cache-dir", str(work / "cache"),
                     "--data", str(data_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_training("export", "--checkpoint", str(work / "run" / "best.pt"), "--out", str(work / "release"),
                     "--version", "0.1-test")
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "release"


@pytest.fixture(scope="session")
def tiny_mar(tmp_path_factory, tiny_release) -> Path:
    from stack.archive import build_mar

    return build_mar(tiny_release, tmp_path_factory.mktemp("store"))[1]


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Debian's headless Chromium driven by selenium, shared by the page tests."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromedriver are needed (./skin test installs Debian's chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1000,1400",
                 f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto) on loopback with a bucket "models"; AWS settings for this module only."""
    import time

    import boto3
    import requests

    from ops.store import ArchiveStore
    from stack.torchserve import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    patch = pytest.MonkeyPatch()  # for this module only: no AWS setting leaks into the rest of the session
    for key, value in env.items():
        patch.setenv(key, value)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(endpoint, timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.2)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
    yield ArchiveStore("models", "models", endpoint, "us-east-1"), {**env, "SKIN_S3_BUCKET": "models",
                                                                      "SKIN_S3_ENDPOINT": endpoint}
    patch.undo()
    proc.terminate()
    proc.wait(timeout=10)


def pytest_collection_modifyitems(config, items):
    """Tests that read a background job's result run last (tests/background.py)."""
    from tests import background

    background.order(items)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """Starts the background jobs this run's tests read, as the tests start (not for --collect-only,
    --setup-plan or --setup-only, nor --fixtures, which never reach this loop)."""
    option = session.config.option
    if not (option.collectonly or getattr(option, "setupplan", False) or getattr(option, "setuponly", False)):
        from tests import background

        background.start_for(session.items)


def pytest_sessionfinish(session, exitstatus):
    from tests import background

    background.stop_all()
