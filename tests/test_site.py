"""The upload page: rendered from meta.json, self-contained, and driven in a real headless Chromium."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from stack.gate import GateThread
from stack.torchserve import TorchServe, free_port

REPO = Path(__file__).resolve().parents[1]


def build(meta_path: Path, out: Path, api_base: str = "") -> Path:
    r = subprocess.run([sys.executable, "-m", "stack.page", "--meta", str(meta_path), "--out", str(out),
                        "--api-base", api_base], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_rendered_page_is_complete_and_self_contained(tiny_release, tmp_path):
    out = build(tiny_release / "meta.json", tmp_path / "dist")
    meta = json.loads((tiny_release / "meta.json").read_text())
    for name in ("index.html", "app.js", "style.css"):
        text = (out / name).read_text()
        assert not re.search(r"{{|}}|{%|%}", text), f"unresolved template syntax in {name}"
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace("http://www.w3.org", "")), \
            f"external URL in {name}"
    html = (out / "index.html").read_text()
    for full_name in meta["class_full_names"]:
        assert full_name.replace("'", "&#39;") in html
    assert meta["version"] in html and "Not a diagnosis" in html
    config = json.loads(re.search(r'<script id="config" type="application/json">(.*?)</script>', html, re.S).group(1))
    assert [c["code"] for c in config["classes"]] == meta["class_names"]


def test_missing_meta_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stack.page", "--meta", str(tmp_path / "none.json")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def stack(tiny_mar, tiny_release, tmp_path_factory):
    work = tmp_path_factory.mktemp("site")
    ts = TorchServe(tiny_mar.parent, {"skin-lesion": tiny_mar.name}, work / "ts", free_port(), free_port(),
                    free_port()).start()
    site = None
    try:
        ts.wait_ready()
        site = GateThread(build(tiny_release / "meta.json", work / "dist"), ts.inference_url, ts.tokens).start()
        yield ts, site
    finally:
        if site:
            site.stop()
        ts.stop()


def test_proxy_forwards_only_the_inference_paths(stack, sample_images):
    ts, site = stack
    r = requests.post(f"{site.url}/predictions/skin-lesion", data=sample_images[0].read_bytes(), timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 7
    assert "Content-Security-Policy" in r.headers and "Python" not in r.headers.get("Server", "")
    put = requests.put(f"{site.url}/predictions/skin-lesion", data=sample_images[0].read_bytes(), timeout=30)
    assert put.status_code == 200 and put.json()["top"] == r.json()["top"]  # curl -T through the page
    assert requests.get(f"{site.url}/models", timeout=5).status_code == 404  # no management through the page
    assert requests.post(f"{site.url}/models?url=x.mar", timeout=5).status_code == 405  # the page takes no POST there
    from tests.test_gate import exchange, responses  # raw bytes: requests would drop the "/../" itself

    port = int(site.url.rsplit(":", 1)[1])
    for path in (b"/../config.properties", b"/%2e%2e/%2e%2e/config.properties", b"/..%2f..%2fconfig.properties",
                 b"/static/../../README.md"):
        answer = responses(exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert answer and answer[0][0] in (400, 404), (path, answer)
    big = requests.post(f"{site.url}/predictions/skin-lesion", data=b"\0" * (11 * 2**20), timeout=30)
    assert big.status_code == 413 and big.json()["error"] == "too_large"


def test_proxy_reports_a_stopped_api_clearly(tiny_release, tmp_path):
    site = GateThread(build(tiny_release / "meta.json", tmp_path / "dist"), f"http://127.0.0.1:{free_port()}").start()
    try:
        r = requests.post(f"{site.url}/predictions/skin-lesion", data=b"x", timeout=30)
        assert r.status_code == 503 and r.json()["error"] == "unavailable" and int(r.headers["Retry-After"]) > 0
    finally:
        site.stop()


def _wait(drv, predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting in the browser")


def test_browser_upload_shows_the_same_answer_as_the_api(stack, browser, sample_images, tmp_path):
    from selenium.webdriver.common.by import By

    ts, site = stack
    image = sample_images[4]
    api = requests.post(f"{ts.inference_url}/predictions/skin-lesion", data=image.read_bytes(), timeout=30,
                        headers=ts.headers()).json()
    browser.get(site.url + "/")
    assert "Not a diagnosis" in browser.find_element(By.ID, "notice").text
    browser.find_element(By.ID, "file").send_keys(str(image))
    bars = _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#bars li"))
    codes = [b.get_attribute("data-code") for b in bars]
    assert codes == [p["code"] for p in api["predictions"]]
    assert len(codes) == 7 and len(browser.find_elements(By.CSS_SELECTOR, "#bars li.top")) == 3
    assert api["top"]["name"] in browser.find_element(By.ID, "status").text
    assert api["model"]["version"] in browser.find_element(By.ID, "answered-by").text
    banner = browser.find_element(By.ID, "concern")  # the service's flag, worded with its share
    assert banner.is_displayed() == api["concern"]["flagged"]
    if api["concern"]["flagged"]:
        assert f"{100 * api['concern']['probability']:.1f}%" in banner.text
    out = REPO / "tests" / "output"
    out.mkdir(exist_ok=True)
    browser.find_element(By.ID, "explain").click()
    _wait(browser, lambda: browser.find_element(By.ID, "explanation-box").is_displayed())
    assert browser.execute_script("return document.getElementById('explanation').naturalWidth") == 200
    browser.save_screenshot(str(out / "site_prediction.png"))

    fake = tmp_path / "not-really.jpg"
    fake.write_text("this is a text file with a .jpg name")
    browser.find_element(By.ID, "file").send_keys(str(fake))
    status = _wait(browser, lambda: "rejected" in (t := browser.find_element(By.ID, "status").text) and t)
    assert "not an image" in status
    assert not browser.find_elements(By.CSS_SELECTOR, "#bars li")
    assert not browser.find_element(By.ID, "concern").is_displayed()
    browser.save_screenshot(str(out / "site_rejected.png"))


def test_the_page_says_whether_uploads_are_kept_for_review(tiny_release, tmp_path):
    """Off (the default): "not stored". On: the page names the retention and its days, as this deployment keeps."""
    from stack.page import render_page

    default = (render_page(tiny_release, tmp_path / "off") / "index.html").read_text()
    kept = (render_page(tiny_release, tmp_path / "on", review_keep_days=14) / "index.html").read_text()
    assert "classified in memory and not stored" in default and "review" not in default.split("<footer")[1]
    assert "kept for\n  14 days" in kept or "kept for 14 days" in " ".join(kept.split())
    assert "classified in memory and not stored" not in kept
