"""KServe's TorchServe runtime, without a cluster: `ops publish --kserve` writes the layout the runtime reads
(moto S3), the layout is downloaded as the storage initializer would, and TorchServe is started on it the way the
runtime starts it (its flags, TS_SERVICE_ENVELOPE=kserve, TS_* ports) to answer v1 instances through our handler.
What is not run here: the KServe wrapper on 8080 (it forwards /v1/models/<name>:predict to this TorchServe)."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
import requests

from ops.kserve import kserve_config
from ops.store import sha256_file
from stack.gate import GateThread
from stack.torchserve import free_port
from tests.test_versions import build_version

REPO = Path(__file__).resolve().parents[1]
NAME = "skin-lesion"


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_the_config_keeps_our_limits_and_closes_what_the_cluster_must_not_see():
    config = _properties(kserve_config(NAME, "3.0", f"{NAME}.mar"))
    ours = _properties((REPO / "config.properties").read_text())
    for key in ("job_queue_size", "default_response_timeout", "vmargs"):
        assert config[key] == ours[key], key
    # The largest image the entry accepts still fits once base64-encoded in a v1 instance.
    largest = base64.b64encode(b"\0" * int(ours["max_request_size"]))
    assert len(json.dumps({"instances": [{"data": largest.decode()}]})) <= int(config["max_request_size"])
    assert config["inference_address"].startswith("http://127.0.0.1:") and "127.0.0.1" in config["management_address"]
    assert config["enable_model_api"] == "false" and config["enable_envvars_config"] == "true"
    assert config["model_store"] == "/mnt/models/model-store"
    snapshot = json.loads(config["model_snapshot"])
    model = snapshot["models"][NAME]["3.0"]
    assert snapshot["modelCount"] == 1 and model["marName"] == f"{NAME}.mar" and model["defaultVersion"] is True
    assert model["batchSize"] == 1, "the kserve envelope reads only the first request of a batch"


def test_published_layout_serves_v1_instances_like_the_runtime(s3, tiny_release, tmp_path, sample_images):
    store, env = s3
    mar, meta = build_version(tiny_release, tmp_path / "build", "3.0")
    r = subprocess.run([sys.executable, "-m", "ops", "publish", "--mar", str(mar), "--meta", str(meta), "--kserve",
                        str(tiny_release)], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    uri = store.storage_uri(NAME, "3.0")
    assert f"KServe storageUri: {uri}" in r.stdout

    # The storage initializer: every object under the storageUri, into the folder mounted at /mnt/models.
    mnt = tmp_path / "mnt" / "models"
    s3c = boto3.client("s3", endpoint_url=store.endpoint_url)
    prefix = uri.split("/", 3)[3] + "/"
    keys = [o["Key"] for o in s3c.list_objects_v2(Bucket=store.bucket, Prefix=prefix)["Contents"]]
    assert sorted(k[len(prefix):] for k in keys) == ["config/config.properties", f"model-store/{NAME}.mar"]
    for key in keys:
        (mnt / key[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
        s3c.download_file(store.bucket, key, str(mnt / key[len(prefix):]))
    sums = json.loads(s3c.get_object(Bucket=store.bucket, Key=f"models/{NAME}/3.0/checksums.json")["Body"].read())
    assert sums["files"][f"kserve/model-store/{NAME}.mar"] == sha256_file(mnt / "model-store" / f"{NAME}.mar")
    with zipfile.ZipFile(mnt / "model-store" / f"{NAME}.mar") as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert manifest["model"]["modelVersion"] == "3.0"

    # TorchServe as the runtime starts it; the TS_* variables stand in for a pod's own ports.
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc_i", "grpc_m")}
    work = tmp_path / "ts"
    work.mkdir()
    runtime_env = {**os.environ, "TS_SERVICE_ENVELOPE": "kserve", "OMP_NUM_THREADS": "1",
                   "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports['inference']}",
                   "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports['management']}",
                   "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports['metrics']}",
                   "TS_GRPC_INFERENCE_PORT": str(ports["grpc_i"]), "TS_GRPC_MANAGEMENT_PORT": str(ports["grpc_m"]),
                   "LOG_LOCATION": str(work / "logs"), "METRICS_LOCATION": str(work / "logs"),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground",
                             f"--model-store={mnt / 'model-store'}", f"--ts-config={mnt / 'config' / 'config.properties'}"],
                            cwd=work, env=runtime_env, stdout=open(work / "out.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline, ready = time.monotonic() + 180, False
        while time.monotonic() < deadline and not ready:
            try:
                described = requests.get(f"http://127.0.0.1:{ports['management']}/models/{NAME}", timeout=5).json()
                ready = sum(w["status"] == "READY" for w in described[0]["workers"]) == 2
            except (requests.RequestException, KeyError, IndexError, ValueError):
                pass
            time.sleep(0.5)
        assert ready, (work / "out.log").read_text(errors="replace")[-3000:]
        assert described[0]["batchSize"] == 1 and described[0]["modelVersion"] == "3.0"

        def predict(image: Path) -> tuple[int, dict]:
            body = {"instances": [{"data": base64.b64encode(image.read_bytes()).decode()}]}
            r = requests.post(f"http://127.0.0.1:{ports['inference']}/predictions/{NAME}", json=body, timeout=60)
            return r.status_code, r.json()

        with ThreadPoolExecutor(4) as pool:  # concurrent requests: each answered (batchSize 1)
            answers = list(pool.map(predict, sample_images[:4] * 2))
        for status, answer in answers:
            assert status == 200 and len(answer["predictions"]) == 1, answer
            got = answer["predictions"][0]
            assert got["verdict"] in ("ok", "uncertain", "not_dermoscopy") and len(got["predictions"]) == 7
            assert got["model"] == {"name": NAME, "version": "3.0"}
        firsts = [a["predictions"][0]["predictions"] for _, a in answers]
        assert firsts[:4] == firsts[4:], "the same image must get the same answer"

        # The page's entry in front of it, speaking v1 (deploy/k8s runs the gate with --protocol kserve-v1):
        # TorchServe's frontend serves the same v1 paths as the KServe wrapper it stands in for here.
        gate = GateThread(None, f"http://127.0.0.1:{ports['inference']}", protocol="kserve-v1").start()
        try:
            image = sample_images[0].read_bytes()
            r = requests.post(f"{gate.url}/predictions/{NAME}", data=image, timeout=60)
            assert r.status_code == 200 and r.json()["predictions"] == firsts[0], r.text[:500]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            bad = requests.post(f"{gate.url}/predictions/{NAME}", data=b"GIF89a" + b"\0" * 64, timeout=60)
            assert bad.status_code == 415 and bad.json()["error"] == "not_an_image", bad.text[:300]
            # Under KServe the handler's refusal travels inside a 200 (the wrapper would turn any other status into
            # its own 500); the gate gives the client the handler's status.
            direct = requests.post(f"http://127.0.0.1:{ports['inference']}/v1/models/{NAME}:predict", timeout=60,
                                   json={"instances": [{"data": base64.b64encode(b"GIF89a").decode()}]})
            assert direct.status_code == 200 and direct.json()["predictions"][0]["status"] == 415, direct.text[:300]
            e = requests.post(f"{gate.url}/explanations/{NAME}", data=image, timeout=120)
            assert e.status_code == 200 and e.json()["explanation"]["image_png_base64"], e.text[:300]
            targeted = requests.post(f"{gate.url}/explanations/{NAME}", timeout=120,
                                     json={"data": base64.b64encode(image).decode(), "target": "mel"})
            assert targeted.status_code == 200 and targeted.json()["explanation"]["class"] == "mel", targeted.text[:300]
            # /ping maps to the wrapper's v1 readiness (GET /v1/models/<name>), which TorchServe's frontend does
            # not serve: not checked here (no KServe wrapper runs in this test).
        finally:
            gate.stop()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.fast
def test_v1_bodies_that_are_not_utf8_are_refused_before_the_envelope(caplog):
    """UTF-16 JSON passes json.loads but cannot be put in a v1 envelope: a 400 with a reason from the gate, never
    a 500 and a logged traceback (the upstream here is nobody: nothing may be forwarded)."""
    import logging

    gate = GateThread(None, f"http://127.0.0.1:{free_port()}", protocol="kserve-v1").start()
    try:
        with caplog.at_level(logging.ERROR, logger="gate"):
            for encoding in ("utf-16", "utf-32", "utf-16-be"):
                body = json.dumps({"data": base64.b64encode(b"\xff\xd8\xff").decode()}).encode(encoding)
                r = requests.post(f"{gate.url}/predictions/{NAME}", data=body, timeout=30,
                                  headers={"Content-Type": "application/json"})
                assert r.status_code == 400 and r.json()["error"] == "bad_json", (encoding, r.text)
        assert not caplog.records, [rec.getMessage() for rec in caplog.records]
    finally:
        gate.stop()
