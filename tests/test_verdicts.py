"""One verdict, one code path: a release whose dermoscopy check thresholds put three real photos in the three
verdicts; /predictions and /explanations agree on each, a refusal gets no heat map, and the page shows all
three as they should read."""
from __future__ import annotations

import re
import shutil
import types

import pytest
import requests
import torch

from handler.skin_handler import SkinLesionHandler
from skinmodel.networks import features_and_logits
from skinmodel.release import CHECK_STATS_FILE, ReleaseMeta
from stack.archive import build_mar
from stack.gate import GateThread
from stack.page import render_page
from stack.torchserve import TorchServe, free_port
from tests.test_site import _wait

NAME = "skin-lesion"


@pytest.fixture(scope="module")
def verdict_release(tiny_release, sample_images, tmp_path_factory):
    """The tiny release with thresholds chosen so that, of the sample photos, the one farthest from the rest is
    refused, the least confident of the others is uncertain, and the others are ok."""
    out = tmp_path_factory.mktemp("verdicts") / "release"
    shutil.copytree(tiny_release, out)
    handler = SkinLesionHandler()
    handler.initialize(types.SimpleNamespace(system_properties={"model_dir": str(out)}, manifest={"model": {}}))
    images = [p.read_bytes() for p in sample_images]
    (tensor, _), _ = handler.preprocess([{"body": b} for b in images])
    with torch.inference_mode():
        feats, logits = features_and_logits(handler.model, tensor)
    centre = feats.mean(0)
    distances = (feats - centre).norm(dim=1)
    top = torch.softmax(logits / handler.temperature, 1).max(1).values  # calibrated, as the handler answers
    order = distances.argsort(descending=True).tolist()
    refused, rest = order[0], order[1:]
    by_confidence = sorted(rest, key=lambda i: float(top[i]))
    uncertain, ok = by_confidence[0], by_confidence[-1]
    assert float(distances[order[0]]) > float(distances[order[1]]) and float(top[by_confidence[0]]) < float(top[by_confidence[1]])
    # A linear "is this dermoscopy" head, as training/dermoscopy/check.py writes one: the projection on the direction
    # of the farthest photo scores it highest (|d| beats every other projection, each at most its own |d|).
    direction = (feats[refused] - centre) / distances[refused]
    projections = (feats - centre) @ direction
    second = float(projections[rest].max())
    torch.save({"mean": centre, "scale": torch.ones_like(centre), "weight": direction, "bias": torch.tensor(0.0)},
               out / CHECK_STATS_FILE)
    meta = ReleaseMeta.load(out)
    meta.dermoscopy_check = {"uncertain_below": float(top[by_confidence[0]] + top[by_confidence[1]]) / 2,
                             "refuse_above": (float(projections[refused]) + second) / 2, "stats_file": CHECK_STATS_FILE}
    # A concern threshold between the ok and the uncertain photo's share: the page must show one banner, not both.
    probabilities = torch.softmax(logits / handler.temperature, 1)
    concerning = [meta.class_names.index(c) for c in meta.concerning]
    shares = [float(probabilities[i, concerning].sum()) for i in (ok, uncertain)]
    assert abs(shares[0] - shares[1]) > 1e-3, shares
    meta.concern = {"threshold": sum(shares) / 2}
    meta.save(out)
    return out, {"ok": sample_images[ok], "uncertain": sample_images[uncertain], "not_dermoscopy": sample_images[refused]}


@pytest.fixture(scope="module")
def served(verdict_release, tmp_path_factory):
    release, photos = verdict_release
    work = tmp_path_factory.mktemp("verdict-stack")
    # One worker that waits 300 ms to fill a batch of 8: concurrent predictions and explanations share batches.
    config = work / "model-config.yaml"
    config.write_text("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 8\nmaxBatchDelay: 300\nresponseTimeout: 60\n")
    _, mar = build_mar(release, work / "store", model_config=config)
    # Review retention on: the per-client share test reads work/review.
    ts = TorchServe(mar.parent, {NAME: mar.name}, work / "ts", free_port(), free_port(), free_port(),
                    env={"SKIN_REVIEW_DIR": str(work / "review"), "SKIN_REVIEW_KEEP_DAYS": "1"}).start()
    gate = None
    try:
        ts.wait_ready()
        gate = GateThread(render_page(release, work / "dist"), ts.inference_url, ts.tokens).start()
        gate.review = work / "review"
        yield gate, photos, ts
    finally:
        if gate:
            gate.stop()
        ts.stop()


def test_predictions_and_explanations_give_the_same_verdict_and_top(served):
    gate, photos, ts = served
    for verdict, photo in photos.items():
        data = photo.read_bytes()
        p = requests.post(f"{gate.url}/predictions/{NAME}", data=data, timeout=60).json()
        e = requests.post(f"{gate.url}/explanations/{NAME}", data=data, timeout=60).json()
        assert p["verdict"] == e["verdict"] == verdict, (verdict, p["verdict"], e["verdict"])
        assert p["top"] == e["top"] and p["predictions"] == e["predictions"]
        if verdict == "not_dermoscopy":
            assert e["top"] is None and "explanation" not in e, "a refused image got a heat map"
        else:
            assert e["explanation"]["class"] == e["top"]["code"] and e["explanation"]["image_png_base64"]


def test_a_batch_mixing_predictions_and_explanations_answers_each_as_asked(served):
    """TorchServe puts both endpoints' requests in one batch; BaseHandler alone would answer the whole batch as
    its first request asked (heat maps for predictions, or none for explanations)."""
    from concurrent.futures import ThreadPoolExecutor

    gate, photos, ts = served
    data = photos["ok"].read_bytes()
    jobs = [("explanations" if i % 2 else "predictions", i) for i in range(8)]
    for leader in ("predictions", "explanations"):  # either kind first in the batch
        order = sorted(jobs, key=lambda j: j[0] != leader)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda j: (j[0], requests.post(f"{ts.inference_url}/{j[0]}/{NAME}", data=data,
                                                                      headers=ts.headers(), timeout=60)), order))
        for path, r in answers:
            assert r.status_code == 200, r.text
            assert ("explanation" in r.json()) == (path == "explanations"), (leader, path)


def ts_context(release, headers: list[dict]):
    """TorchServe's own Context for one batch, one request header dict per request (as its frontend builds it)."""
    import os

    import ts
    from ts.context import Context, RequestProcessor
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"))
    metrics.initialize_cache()
    context = Context(NAME, str(release), {"model": {}}, len(headers), None, "0.12.0", metrics=metrics)
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"r{i}" for i in range(len(headers))}
    return context


def test_each_request_of_a_batch_is_answered_as_its_own_header_asks(verdict_release):
    """The same claim without TorchServe's scheduling: one batch through the handler with TorchServe's own
    Context, kinds and verdicts mixed, each kind leading in turn. Fails if any request is answered by the
    first request's kind, or if a refused image gets a heat map."""
    release, photos = verdict_release
    handler = SkinLesionHandler()
    handler.initialize(types.SimpleNamespace(system_properties={"model_dir": str(release)}, manifest={"model": {}}))
    batch = [(v, kind) for v in ("not_dermoscopy", "ok", "uncertain") for kind in ("explanation", "prediction")]
    for order in (batch, batch[1:] + batch[:1]):  # an explanation leads, then a prediction does
        context = ts_context(release, [{"explain": "True"} if kind == "explanation" else {} for _, kind in order])
        answers = handler.handle([{"body": photos[v].read_bytes()} for v, _ in order], context)
        for (verdict, kind), answer in zip(order, answers):
            assert answer["verdict"] == verdict, (order[0], verdict, kind, answer.get("verdict"))
            wants_map = kind == "explanation" and verdict != "not_dermoscopy"
            assert ("explanation" in answer) == wants_map, (order[0], verdict, kind)


def test_only_uncertain_and_refused_uploads_are_kept_and_only_when_asked(verdict_release, tmp_path, monkeypatch):
    """The opt-in review retention through the handler's real path (handle() with TorchServe's Context)."""
    import hashlib

    release, photos = verdict_release
    folder = tmp_path / "review"
    for keep_days in (None, "5"):
        if keep_days:
            monkeypatch.setenv("SKIN_REVIEW_DIR", str(folder))
            monkeypatch.setenv("SKIN_REVIEW_KEEP_DAYS", keep_days)
        else:
            monkeypatch.delenv("SKIN_REVIEW_KEEP_DAYS", raising=False)
            monkeypatch.setenv("SKIN_REVIEW_DIR", str(folder))  # a folder alone does not turn it on
        handler = SkinLesionHandler()
        handler.initialize(types.SimpleNamespace(system_properties={"model_dir": str(release)}, manifest={"model": {}}))
        answers = handler.handle([{"body": p.read_bytes()} for p in photos.values()],
                                 ts_context(release, [{} for _ in photos]))
        assert [a["verdict"] for a in answers] == list(photos)
        if not keep_days:
            assert not folder.exists(), "retention is off by default"
    kept = {p.name: p for p in folder.iterdir()}
    expected = {hashlib.sha256(photos[v].read_bytes()).hexdigest() + ".jpg": photos[v]
                for v in ("uncertain", "not_dermoscopy")}
    assert set(kept) == set(expected) and folder.stat().st_mode & 0o777 == 0o700
    for name, source in expected.items():  # a bounded JPEG re-encoding of the upload (named by its hash), owner-only
        from PIL import Image

        from skinmodel.review_store import KEEP_SIDE

        with Image.open(kept[name]) as img, Image.open(source) as original:
            assert img.format == "JPEG" and max(img.size) == min(KEEP_SIDE, max(original.size))
        assert kept[name].stat().st_mode & 0o777 == 0o600


def test_kept_uploads_are_filed_by_the_gates_opaque_name_for_each_client(served):
    """Through the gate, TorchServe's handler learns each client only as the gate's keyed hash of its address
    (X-Skin-Client) and keeps its refused uploads in that client's subfolder, which has its share of the quota;
    the owner's direct request (with the key) is kept at the top. No address appears in the folder."""
    import hashlib

    from stress.request_attacks import session_from

    gate, photos, ts = served
    data = photos["not_dermoscopy"].read_bytes()
    name = hashlib.sha256(data).hexdigest() + ".jpg"
    folders = lambda: {p for p in gate.review.iterdir() if p.is_dir()} if gate.review.exists() else set()  # noqa: E731
    before = folders()  # other tests of this module post through the gate too
    for source in ("127.0.0.31", "127.0.0.32"):
        r = session_from(source).post(gate.url + "/predictions/" + NAME, data=data, timeout=60)
        assert r.status_code == 200 and r.json()["verdict"] == "not_dermoscopy", r.text
    r = requests.post(ts.inference_url + "/predictions/" + NAME, data=data, headers=ts.tokens.header("inference"),
                      timeout=60)
    assert r.status_code == 200
    new = sorted(folders() - before)
    assert len(new) == 2 and all(re.fullmatch(r"[0-9a-f]{16}", p.name) for p in folders()), new
    assert all((p / name).exists() for p in new) and (gate.review / name).exists()
    assert not any("127.0.0" in str(p) for p in gate.review.rglob("*"))


def test_the_page_shows_each_verdict_as_it_should_read(served, browser):
    from selenium.webdriver.common.by import By

    gate, photos, ts = served
    browser.get(gate.url + "/")
    status = lambda: browser.find_element(By.ID, "status")  # noqa: E731
    explain = browser.find_element(By.ID, "explain")
    answered = lambda: browser.find_element(By.ID, "answered-by").text  # noqa: E731

    banner = lambda: browser.find_element(By.ID, "concern")  # noqa: E731
    flags = {v: requests.post(f"{ts.inference_url}/predictions/{NAME}", data=photos[v].read_bytes(), timeout=30,
                              headers=ts.headers()).json()["concern"]["flagged"] for v in ("ok", "uncertain")}
    assert flags["ok"] != flags["uncertain"], "the fixture's threshold must flag one of the two"

    browser.find_element(By.ID, "file").send_keys(str(photos["ok"]))
    _wait(browser, lambda: status().get_attribute("class") == "ok")
    assert banner().is_displayed() == flags["ok"]
    assert "Most similar to" in status().text and "unsure" not in status().text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars li")) == 7 and explain.is_displayed()
    assert "not a diagnosis" in answered()
    size = browser.get_window_size()
    browser.set_window_size(1000, 560)  # a laptop-height window: the heat map opens below the fold
    try:
        below = "return document.getElementById('explanation-box').offsetTop > window.innerHeight"
        explain.click()
        _wait(browser, lambda: browser.find_element(By.ID, "explanation-box").is_displayed())
        assert browser.execute_script(below), "the test must start with the heat map below the fold"
        assert status().get_attribute("class") == "ok"
        in_view = ("const r = document.getElementById('explanation').getBoundingClientRect();"
                   "return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight + 1")
        _wait(browser, lambda: browser.execute_script(in_view))  # raises if the heat map never comes into view
    finally:
        browser.set_window_size(size["width"], size["height"])

    browser.find_element(By.ID, "file").send_keys(str(photos["uncertain"]))
    _wait(browser, lambda: status().get_attribute("class") == "uncertain")
    text = status().text
    assert "unsure" in text.lower() and text.lower().count("unsure") == 1, text
    assert banner().is_displayed() == flags["uncertain"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars li")) == 7 and explain.is_displayed()

    browser.find_element(By.ID, "file").send_keys(str(photos["not_dermoscopy"]))
    _wait(browser, lambda: status().get_attribute("class") == "refused")
    assert "Not analysed" in status().text and not banner().is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, "#bars li") and not explain.is_displayed()
    assert not browser.find_element(By.ID, "explanation-box").is_displayed()
    assert "not a diagnosis" in answered(), "the refusal lacks the notice"
    icons = browser.execute_script("return fetch('/favicon.ico').then(r => r.status)")
    assert icons == 200


def test_a_check_score_between_clearly_dermoscopy_and_refusal_is_uncertain_never_ok():
    """Release 1.2's second dermoscopy check threshold: however confident the classifier, a picture whose check score
    lies between clear_below and refuse_above is answered uncertain, and the reason says the check is why."""
    import dataclasses
    from pathlib import Path

    from skinmodel.answers import CHECK_UNCERTAIN_REASON, VERDICT_REASONS, format_prediction

    meta = ReleaseMeta.load(Path(__file__).resolve().parents[1] / "release")
    meta = dataclasses.replace(meta, dermoscopy_check={"uncertain_below": 0.4, "clear_below": 0.0, "refuse_above": 2.0})
    confident = [0.01, 0.01, 0.01, 0.01, 0.94, 0.01, 0.01]
    answers = {s: format_prediction(confident, meta, check_score=s) for s in (-1.0, 0.5, 1.99, 2.5)}
    assert answers[-1.0]["verdict"] == "ok" and answers[-1.0]["verdict_reason"] == VERDICT_REASONS["ok"]
    for s in (0.5, 1.99):
        assert answers[s]["verdict"] == "uncertain" and answers[s]["verdict_reason"] == CHECK_UNCERTAIN_REASON, s
    assert answers[2.5]["verdict"] == "not_dermoscopy" and answers[2.5]["top"] is None
    unsure = format_prediction([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1], meta, check_score=-1.0)
    assert unsure["verdict"] == "uncertain" and unsure["verdict_reason"] == VERDICT_REASONS["uncertain"]


def test_the_served_check_reads_each_upload_colours_before_the_colour_constancy(tiny_release, tmp_path):
    """A check whose head reads only the colour columns (the log illuminant, red minus blue): the handler's score
    of a flat-coloured upload is that difference, known without the project's code, and a colour cast that the
    colour constancy takes out of the network's input still moves it."""
    import dataclasses
    import io

    import numpy as np
    from PIL import Image

    from skinmodel.preprocessing import COLOUR_STATISTICS

    out = tmp_path / "release"
    shutil.copytree(tiny_release, out)
    meta = ReleaseMeta.load(out)
    meta.preprocessing = dataclasses.replace(meta.preprocessing, colour_constancy="shades_of_gray_p6")
    width = 512 + COLOUR_STATISTICS  # ResNet18's features, then the colours
    weight = torch.zeros(width)
    weight[512], weight[514] = 1.0, -1.0
    torch.save({"mean": torch.zeros(width), "scale": torch.ones(width), "weight": weight, "bias": torch.tensor(0.0)},
               out / CHECK_STATS_FILE)
    meta.dermoscopy_check = {"uncertain_below": 0.0, "refuse_above": 1.0, "stats_file": CHECK_STATS_FILE}
    meta.save(out)
    handler = SkinLesionHandler()
    handler.initialize(types.SimpleNamespace(system_properties={"model_dir": str(out)}, manifest={"model": {}}))
    colours = [(200, 100, 50), (50, 100, 200)]
    rows = []
    for rgb in colours:
        buf = io.BytesIO()
        Image.new("RGB", (120, 90), rgb).save(buf, "PNG")
        rows.append({"body": buf.getvalue()})
    batch = handler.preprocess(rows)
    (tensor, _), _ = batch
    assert torch.allclose(tensor[0], tensor[1])  # the network sees the same grey picture
    (_, scores), _ = handler.inference(batch)
    expected = [np.log(r / 255 + 1e-3) - np.log(b / 255 + 1e-3) for r, _, b in colours]
    assert scores == pytest.approx(expected, abs=1e-4)
    # statistics of another width (another network or colour layout) stop the release at load, not each batch
    torch.save({"mean": torch.zeros(width - 1), "scale": torch.ones(width - 1), "weight": weight[:-1],
                "bias": torch.tensor(0.0)}, out / CHECK_STATS_FILE)
    with pytest.raises(ValueError, match="columns"):
        SkinLesionHandler().initialize(types.SimpleNamespace(system_properties={"model_dir": str(out)},
                                                             manifest={"model": {}}))
