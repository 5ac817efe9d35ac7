"""Model versions: publish to a real S3-compatible server (moto on loopback), swap on a real TorchServe."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests

from ops.store import StoreError
from ops.swap import SwapError, previous_version, swap
from skinmodel.release import ReleaseMeta
from stack.torchserve import TorchServe, free_port

REPO = Path(__file__).resolve().parents[1]
NAME = "skin-lesion"


def build_version(tiny_release, out: Path, version: str) -> tuple[Path, Path]:
    from stack.archive import build_mar

    _, mar = build_mar(tiny_release, out, version=version, file_name=f"{NAME}-{version}.mar")
    meta = out / f"meta-{version}.json"
    with zipfile.ZipFile(mar) as z:
        meta.write_bytes(z.read("meta.json"))
    return mar, meta


@pytest.fixture(scope="module")
def published(s3, tiny_release, tmp_path_factory):
    store, env = s3
    build = tmp_path_factory.mktemp("build")
    for v in ("1.0", "2.0"):
        mar, meta = build_version(tiny_release, build, v)
        r = subprocess.run([sys.executable, "-m", "ops", "publish", "--mar", str(mar), "--meta", str(meta)],
                           cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return store, build


def test_published_versions_are_listed_and_immutable(published, s3):
    store, build = published
    assert store.versions(NAME) == ["1.0", "2.0"]
    with pytest.raises(StoreError, match="already published"):
        store.publish(build / f"{NAME}-1.0.mar", ReleaseMeta.load(build / "meta-1.0.json"))
    r = subprocess.run([sys.executable, "-m", "ops", "publish", "--mar", str(build / f"{NAME}-2.0.mar"), "--meta",
                        str(build / "meta-2.0.json")], cwd=REPO, env={**os.environ, **s3[1]}, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "already published" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def serving_v1(published, tmp_path):
    store, build = published
    model_store = tmp_path / "model_store"
    model_store.mkdir()
    store.fetch(NAME, "1.0", model_store / f"{NAME}-1.0.mar")
    ts = TorchServe(model_store, {NAME: f"{NAME}-1.0.mar"}, tmp_path / "ts", free_port(), free_port(), free_port(),
                    enable_model_api=True).start()
    try:
        ts.wait_ready(min_workers=2)
        yield ts, store, model_store, ts.api
    finally:
        ts.stop()


def test_swap_under_load_then_rollback(serving_v1, sample_images):
    ts, store, model_store, admin = serving_v1
    images = [p.read_bytes() for p in sample_images]
    stop, seen, failures = threading.Event(), [], []

    def client(i):
        while not stop.is_set():
            r = requests.post(f"{ts.inference_url}/predictions/{NAME}", data=images[i % len(images)], timeout=60,
                              headers=ts.headers())
            if r.status_code == 200:
                seen.append(r.json()["model"]["version"])
            else:
                failures.append((r.status_code, r.text[:200]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        swap(admin, store, model_store, NAME, "2.0", images[:2], workers=1, drain_seconds=1.0, log=lambda *_: None)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures[:3]
    assert seen[0] == "1.0" and seen[-1] == "2.0"
    switch = seen.index("2.0")
    assert set(seen[switch + 8:]) == {"2.0"}, "v1 still answered long after the swap"
    assert admin.default_version(NAME) == "2.0"
    assert [v["modelVersion"] for v in admin.versions(NAME)] == ["2.0"]

    assert previous_version(model_store, NAME) == "1.0"
    swap(admin, store, model_store, NAME, "1.0", images[:1], workers=1, drain_seconds=0.5, log=lambda *_: None)
    r = requests.post(f"{ts.inference_url}/predictions/{NAME}", data=images[0], timeout=30, headers=ts.headers())
    assert r.status_code == 200 and r.json()["model"]["version"] == "1.0"


def test_corrupted_archive_is_refused_and_v1_keeps_serving(serving_v1, published, sample_images):
    ts, store, model_store, admin = serving_v1
    _, build = published
    bad = bytearray((build / f"{NAME}-2.0.mar").read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    store.client.put_object(Bucket=store.bucket, Key=store.key(NAME, "2.0", f"{NAME}.mar"), Body=bytes(bad))
    try:
        with pytest.raises(SwapError, match="checksum mismatch.*1.0 keeps serving"):
            swap(admin, store, model_store, NAME, "2.0", [sample_images[0].read_bytes()], log=lambda *_: None)
        assert not (model_store / f"{NAME}-2.0.mar").exists()
        assert [v["modelVersion"] for v in admin.versions(NAME)] == ["1.0"]
        r = requests.post(f"{ts.inference_url}/predictions/{NAME}", data=sample_images[0].read_bytes(), timeout=30,
                          headers=ts.headers())
        assert r.status_code == 200 and r.json()["model"]["version"] == "1.0"
    finally:
        store.client.upload_file(str(build / f"{NAME}-2.0.mar"), store.bucket, store.key(NAME, "2.0", f"{NAME}.mar"))


def test_failed_canary_undoes_the_swap(serving_v1, sample_images):
    ts, store, model_store, admin = serving_v1
    with pytest.raises(SwapError, match="canary.*undone.*1.0 keeps serving"):
        swap(admin, store, model_store, NAME, "2.0", [b"not an image"], workers=1, log=lambda *_: None)
    assert [v["modelVersion"] for v in admin.versions(NAME)] == ["1.0"]
    assert admin.default_version(NAME) == "1.0"


def test_swap_needs_the_model_api(published, tiny_mar, tmp_path, sample_images):
    store, _ = published
    ts = TorchServe(tiny_mar.parent, {NAME: tiny_mar.name}, tmp_path / "ts", free_port(), free_port(),
                    free_port()).start()
    try:
        ts.wait_ready()
        admin = ts.api
        with pytest.raises(SwapError, match="enable_model_api"):
            swap(admin, store, tmp_path, NAME, "2.0", [sample_images[0].read_bytes()], workers=1, log=lambda *_: None)
        # with the management key, so that what refuses it is the model API being off, not the missing key
        r = requests.post(f"{ts.management_url}/models?url=https://example.invalid/evil.mar", timeout=30,
                          headers=ts.headers("management"))
        assert r.status_code == 405, r.text
    finally:
        ts.stop()
