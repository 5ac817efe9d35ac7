"""Zero-downtime version swaps through TorchServe's management API.

swap: fetch + verify -> register beside the current version -> wait for READY workers -> canary predictions
on /predictions/<name>/<new> -> set default -> drain -> unregister the old version. Any failure before
set-default unregisters the new version and leaves the old one serving, untouched.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ops.store import ArchiveStore, StoreError
from stack.torchserve_api import ManagementError, TorchServeClient


class SwapError(RuntimeError):
    pass


def canary(client: TorchServeClient, name: str, version: str, images: list[bytes]) -> None:
    """Predictions on the new version itself (/predictions/<name>/<version>), with the clients' retry policy."""
    for i, data in enumerate(images):
        r = client.predict(f"/predictions/{name}/{version}", data)
        ok = r.status_code == 200
        body = r.json() if ok else {}
        probs = [p["probability"] for p in body.get("predictions", [])]
        if not ok or body.get("model", {}).get("version") != version or abs(sum(probs) - 1) > 1e-3:
            raise SwapError(f"canary {i + 1}/{len(images)} on {name} {version} failed: HTTP {r.status_code} "
                            f"{' '.join(r.text.split())[:200]}")


def history_file(model_store: Path, name: str) -> Path:
    return model_store / f".{name}-versions.json"


def swap(admin: TorchServeClient, store: ArchiveStore, model_store: Path, name: str, version: str,
         canary_images: list[bytes], workers: int = 2, drain_seconds: float = 3.0, log=print) -> dict:
    current = admin.default_version(name)
    if current == version:
        raise SwapError(f"{name} {version} is already the default version")
    try:
        registered = admin.versions(name)
    except ManagementError as exc:
        raise SwapError(str(exc)) from None
    if any(v["modelVersion"] == version for v in registered):
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
        admin.wait_ready([name], version, workers)
        log(f"canary: {len(canary_images)} prediction(s) on /predictions/{name}/{version} ...")
        canary(admin, name, version, canary_images)
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
