"""A real TorchServe on free ports, serving a .mar built from the tiny release in a temp dir."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from stack.torchserve import TorchServe, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "skin-lesion"


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_mar, tmp_path_factory):
    ts = TorchServe(tiny_mar.parent, {NAME: tiny_mar.name}, tmp_path_factory.mktemp("ts"),
                    free_port(), free_port(), free_port())
    ts.start()
    try:
        ts.wait_ready(min_workers=2)
        yield ts
    finally:
        proc = ts.proc
        members = {p.pid for p in ts.group_processes()}
        assert len(members) >= 3  # launcher + JVM + 2 workers
        ts.stop()
        # clean shutdown: nothing of the process group is left running
        ts.proc = proc
        assert not ts.group_processes(), "processes left behind"
        ts.proc = None


def predict(ts, data=None, **kw):
    headers = {**ts.headers(), **kw.pop("headers", {})}  # TorchServe's inference key
    return requests.post(f"{ts.inference_url}/predictions/{NAME}", data=data, timeout=30, headers=headers, **kw)


def assert_valid_prediction(r, meta):
    assert r.status_code == 200, r.text
    body = r.json()
    probs = [p["probability"] for p in body["predictions"]]
    assert sorted(p["code"] for p in body["predictions"]) == sorted(meta["class_names"])
    assert probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1) < 1e-4
    assert body["top"] == body["predictions"][0]
    assert body["model"] == {"name": NAME, "version": meta["version"]}
    assert "not a diagnosis" in body["notice"]
    return body


@pytest.fixture(scope="module")
def meta(tiny_mar):
    with zipfile.ZipFile(tiny_mar) as z:
        return json.loads(z.read("meta.json"))


def test_readiness_means_ready_workers(server):
    workers = server.workers(NAME)
    assert len(workers) == 2 and all(w["status"] == "READY" for w in workers)


def test_jpeg_and_png_are_classified(server, meta, sample_images):
    jpeg = sample_images[0].read_bytes()
    a = assert_valid_prediction(predict(server, jpeg), meta)
    png = _png(Image.open(sample_images[0]))
    b = assert_valid_prediction(predict(server, png), meta)
    assert a["top"]["code"] == b["top"]["code"]


def test_same_answer_as_in_process_pipeline(server, meta, tiny_release, sample_images):
    """What TorchServe says equals the shared preprocessing + the same weights run here."""
    import torch

    from skinmodel.networks import build_model, load_state_dict_file
    from skinmodel.preprocessing import PreprocessConfig, preprocess_bytes

    model = build_model(meta["arch"], meta["num_classes"])
    model.load_state_dict(load_state_dict_file(tiny_release / "model.pt"))
    model.eval()
    cfg = PreprocessConfig.from_dict(meta["preprocessing"])
    for path in sample_images[:3]:
        with torch.no_grad():
            local = torch.softmax(model(preprocess_bytes(path.read_bytes(), cfg)[None]), 1)[0]
        served = {p["code"]: p["probability"] for p in predict(server, path.read_bytes()).json()["predictions"]}
        for code, p in zip(meta["class_names"], local.tolist()):
            assert abs(served[code] - p) < 1e-4


def test_upload_shapes(server, meta, sample_images):
    data = sample_images[1].read_bytes()
    assert_valid_prediction(predict(server, files={"data": ("x.jpg", data, "image/jpeg")}), meta)
    assert_valid_prediction(predict(server, files={"file": ("x.jpg", data, "image/jpeg")}), meta)
    assert_valid_prediction(predict(server, json={"data": base64.b64encode(data).decode()}), meta)
    r = requests.put(f"{server.inference_url}/predictions/{NAME}", data=data, timeout=30,  # curl -T
                     headers=server.headers())
    assert_valid_prediction(r, meta)


def _converted_inputs(sample):
    rgb = Image.open(sample).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 8
    return {
        "rgba": _png(rgb.convert("RGBA")),
        "grayscale": _png(rgb.convert("L")),
        "16-bit": _png(Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))),
        "cmyk": _png(rgb.convert("CMYK"), "TIFF"),
        "cmyk-jpeg": _png(rgb.convert("CMYK"), "JPEG"),
        "exif-rotated": _png(rgb, "JPEG", exif=exif.tobytes()),
        "palette": _png(rgb.convert("P")),
    }


def test_unusual_images_are_converted(server, meta, sample_images):
    for label, payload in _converted_inputs(sample_images[2]).items():
        r = predict(server, payload)
        assert r.status_code == 200, (label, r.text)
        assert_valid_prediction(r, meta)


def bad_inputs(sample):
    jpeg = sample.read_bytes()
    return {
        "empty": (b"", 400, "empty_body"),
        "text": (b"just some text pretending to be a jpg", 415, "not_an_image"),
        "truncated": (jpeg[: len(jpeg) // 3], 422, "corrupt_image"),
        "too many pixels": (_png(Image.new("1", (9000, 9000))), 413, "too_many_pixels"),
        "bad base64": (json.dumps({"data": "%%%"}).encode(), 400, "bad_base64"),
    }


def test_bad_inputs_get_their_own_status_and_reason(server, meta, sample_images):
    pids = server.worker_pids(NAME)
    for label, (payload, status, code) in bad_inputs(sample_images[0]).items():
        headers = {"Content-Type": "application/json"} if label == "bad base64" else {}
        r = predict(server, payload, headers=headers)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert r.json()["error"] == code and r.json()["reason"], label
        assert_valid_prediction(predict(server, sample_images[0].read_bytes()), meta)  # next one still fine
    assert server.worker_pids(NAME) == pids, "a worker restarted"


def test_batch_mixing_good_and_bad_requests(server, meta, sample_images):
    """Concurrent requests are batched (batch 4 / 2 ms); each bad one fails alone."""
    good = sample_images[3].read_bytes()
    bad = bad_inputs(sample_images[0])
    payloads = [(good, 200), (bad["text"][0], 415), (good, 200), (bad["truncated"][0], 422)] * 4
    log = server.workdir / "logs" / "ts_log.log"
    batches_before = log.read_text().count("Backend response time")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: predict(server, p[0]), payloads))
    time.sleep(0.5)  # the log line of the last batch
    batches = log.read_text().count("Backend response time") - batches_before
    assert 0 < batches < len(payloads), f"{len(payloads)} requests in {batches} batches: no batch was formed"
    for (_, want), r in zip(payloads, answers):
        assert r.status_code == want, r.text
        if want == 200:
            assert_valid_prediction(r, meta)
        else:
            assert "reason" in r.json()


def test_oversize_body_is_refused_by_the_frontend(server):
    r = predict(server, b"\xff" * (11 * 2**20))
    assert r.status_code == 413


def test_management_listens_on_loopback_only_and_metrics_not_at_all(server):
    """Management and inference on loopback only; the metrics API, which takes no key, is off (config.properties)."""
    import psutil

    java = psutil.Process(server.proc.pid)
    listening = {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port) for p in [java, *java.children(recursive=True)]
                 for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    for url in (server.management_url, server.inference_url):
        port = int(url.rsplit(":", 1)[1])
        assert ("127.0.0.1", port) in listening, (url, listening)
        assert not any(ip in ("0.0.0.0", "::") and p == port for ip, p in listening)
    metrics_port = int(server.metrics_url.rsplit(":", 1)[1])
    assert not any(p == metrics_port for _, p in listening), "the unauthenticated metrics API listens"


def test_archive_script_versions_and_refuses_missing_inputs(tiny_release, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run([f"{REPO}/archive.sh", "--weights-dir", str(tiny_release), "--out", str(tmp_path),
                        "--version", "7.5"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(tmp_path / "skin-lesion.mar") as z:
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == "7.5"
        assert json.loads(z.read("meta.json"))["version"] == "7.5"
        names = set(z.namelist())
        assert {"skin_handler.py", "meta.json", "model.pt", "skinmodel/__init__.py", "skinmodel/preprocessing.py",
                "skinmodel/networks.py", "skinmodel/release.py", "skinmodel/audit.py"} <= names, names
        assert not any("__pycache__" in n for n in names)
    r = subprocess.run([f"{REPO}/archive.sh", "--weights-dir", str(tmp_path / "nothing")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1 and "meta.json is missing" in r.stderr


def test_explanations_return_a_png_of_the_input_size(server, meta, sample_images):
    from PIL import Image

    data = sample_images[0].read_bytes()
    r = requests.post(f"{server.inference_url}/explanations/{NAME}", data=data, timeout=60, headers=server.headers())
    assert r.status_code == 200, r.text
    body = r.json()
    png = base64.b64decode(body["explanation"]["image_png_base64"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 400_000
    assert Image.open(io.BytesIO(png)).size == Image.open(sample_images[0]).size
    assert body["explanation"]["class"] == body["predictions"][0]["code"]
    wanted = meta["class_names"][0]
    r = requests.post(f"{server.inference_url}/explanations/{NAME}", timeout=60, headers=server.headers(),
                      json={"data": base64.b64encode(data).decode(), "target": wanted})
    assert r.status_code == 200 and r.json()["explanation"]["class"] == wanted
    r = requests.post(f"{server.inference_url}/explanations/{NAME}", timeout=60, headers=server.headers(),
                      json={"data": base64.b64encode(data).decode(), "target": "melanoma"})
    assert r.status_code == 400 and r.json()["error"] == "unknown_target"  # not silently another class
    bad = requests.post(f"{server.inference_url}/explanations/{NAME}", data=b"nope", timeout=60,
                        headers=server.headers())
    assert bad.status_code == 415 and bad.json()["error"] == "not_an_image"
