"""Zero-downtime version swaps through TorchServe's management API.

swap: fetch + verify -> register beside the current version -> wait for READY workers -> canary predictions
on /predictions/<name>/<new> -> set default -> drain -> unregister the old version. Any failure before
set-default unregisters the new version and leaves the old one serving, untouched.
"""
from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import requests

from ops.store import ArchiveStore, StoreError
from stack.tokens import TokenFile

CLIENT_RETRY_STATUSES = (503, 507)  # queue full / worker died: retry after a short back-off
MODEL_API_OFF = ("the management API refuses model changes: start TorchServe with enable_model_api=true "
                 "(./skin up --enable-model-api); keep it on loopback")


class SwapError(RuntimeError):
    pass


@dataclass
class TorchServeAdmin:
    management_url: str
    inference_url: str
    tokens: TokenFile | None = None  # TorchServe's key file, when token authorization is on
    timeout: float = 30.0

    def _headers(self, kind: str) -> dict:
        return self.tokens.header(kind) if self.tokens else {}

    def _call(self, method: str, path: str, **kw):
        timeout = kw.pop("timeout", self.timeout)
        r = requests.request(method, self.management_url + path, timeout=timeout, headers=self._headers("management"),
                             **kw)
        if r.status_code == 400 and "InvalidKeyException" in r.text and self.tokens:
            self.tokens.reload()  # the stack renewed the keys since we read them
            r = requests.request(method, self.management_url + path, timeout=timeout,
                                 headers=self._headers("management"), **kw)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        return r.status_code, body

    def versions(self, name: str) -> list[dict]:
        status, body = self._call("GET", f"/models/{name}/all")
        if status == 405:
            raise SwapError(MODEL_API_OFF)
        if status != 200:
            raise SwapError(f"cannot list {name}: HTTP {status} {body}")
        return body

    def default_version(self, name: str) -> str | None:
        """Describing a model without a version describes its default version."""
        status, body = self._call("GET", f"/models/{name}")
        return body[0]["modelVersion"] if status == 200 and body else None

    def register(self, mar_file: str, workers: int) -> None:
        query = urllib.parse.urlencode({"url": mar_file, "initial_workers": workers, "synchronous": "true"})
        status, body = self._call("POST", f"/models?{query}", timeout=300)
        if status == 405:
            raise SwapError(MODEL_API_OFF)
        if status != 200:
            raise SwapError(f"registering {mar_file} failed: HTTP {status} {body}")

    def unregister(self, name: str, version: str) -> None:
        status, body = self._call("DELETE", f"/models/{name}/{version}", timeout=120)
        if status not in (200, 404):
            raise SwapError(f"unregistering {name} {version} failed: HTTP {status} {body}")

    def set_default(self, name: str, version: str) -> None:
        status, body = self._call("PUT", f"/models/{name}/{version}/set-default")
        if status != 200:
            raise SwapError(f"set-default {name} {version} failed: HTTP {status} {body}")

    def wait_ready(self, name: str, version: str, workers: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self._call("GET", f"/models/{name}/{version}")
            if status == 200 and sum(w.get("status") == "READY" for w in body[0].get("workers", [])) >= workers:
                return
            time.sleep(0.5)
        raise SwapError(f"{name} {version} has no {workers} READY worker(s) after {timeout:.0f} s")

    def predict(self, url: str, data: bytes, attempts: int = 3) -> requests.Response:
        """The clients' retry policy: 503 (queue full) and 507 (worker died) are retried after 1 s, then 2 s."""
        for attempt in range(attempts):
            r = requests.post(url, data=data, timeout=60, headers=self._headers("inference"))
            if r.status_code not in CLIENT_RETRY_STATUSES or attempt == attempts - 1:
                return r
            time.sleep(float(r.headers.get("Retry-After", attempt + 1)))
        return r

    def canary(self, name: str, version: str, images: list[bytes]) -> None:
        for i, data in enumerate(images):
            r = self.predict(f"{self.inference_url}/predictions/{name}/{version}", data)
            ok = r.status_code == 200
            body = r.json() if ok else {}
            probs = [p["probability"] for p in body.get("predictions", [])]
            if not ok or body.get("model", {}).get("version") != version or abs(sum(probs) - 1) > 1e-3:
                raise SwapError(f"canary {i + 1}/{len(images)} on {name} {version} failed: HTTP {r.status_code} "
                                f"{' '.join(r.text.split())[:200]}")


def history_file(model_store: Path, name: str) -> Path:
    return model_store / f".{name}-versions.json"


def swap(admin: TorchServeAdmin, store: ArchiveStore, model_store: Path, name: str, version: str,
         canary_images: list[bytes], workers: int = 2, drain_seconds: float = 3.0, log=print) -> dict:
    current = admin.default_version(name)
    if current == version:
        raise SwapError(f"{name} {version} is already the default version")
    if any(v["modelVersion"] == version for v in admin.versions(name)):
        raise SwapError(f"{name} {version} is already registered (not default); unregister it first")
    mar = model_store / f"{name}-{version}.mar"
    log(f"fetching {name} {version} from s3://{store.bucket}/{store.prefix} ...")
    try:
        store.fetch(name, version, mar)
    except StoreError as exc:
        raise SwapError(f"{exc}; {name} {current} keeps serving") from None
    registered = False
    try:
        log(f"registering {mar.name} beside {current} ...")
        admin.register(mar.name, workers)
        registered = True
        admin.wait_ready(name, version, workers)
        log(f"canary: {len(canary_images)} prediction(s) on /predictions/{name}/{version} ...")
        admin.canary(name, version, canary_images)
        admin.set_default(name, version)
    except Exception as exc:
        if registered:
            try:
                admin.unregister(name, version)
            except Exception:  # noqa: BLE001 - report the original failure
                pass
        mar.unlink(missing_ok=True)
        raise SwapError(f"{exc}; the swap was undone and {name} {current} keeps serving") from None
    log(f"{name} {version} is the default; draining {current} for {drain_seconds:.0f} s ...")
    time.sleep(drain_seconds)
    if current:
        admin.unregister(name, current)
    hist = history_file(model_store, name)
    record = json.loads(hist.read_text()) if hist.exists() else {"history": []}
    record["history"].append({"from": current, "to": version, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    hist.write_text(json.dumps(record, indent=2))
    log(f"done: {name} {current} -> {version}")
    return {"from": current, "to": version}


def previous_version(model_store: Path, name: str) -> str:
    hist = history_file(model_store, name)
    if not hist.exists() or not json.loads(hist.read_text())["history"]:
        raise SwapError(f"no swap of {name} is recorded in {model_store}: nothing to roll back to")
    last = json.loads(hist.read_text())["history"][-1]
    if not last["from"]:
        raise SwapError("the last swap had no previous version")
    return last["from"]
