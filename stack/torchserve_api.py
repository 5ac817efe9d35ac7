"""The one client of TorchServe's REST APIs: management (describe, register, set-default, unregister,
readiness, key renewal) and predictions with the clients' retry policy. Used by ./skin (stack), ops and the
tests; every call carries the right token key when token authorization is on, and a key renewed between
reading it and using it is read again once.
"""
from __future__ import annotations

import time
import urllib.parse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from stack.settings import RETRY_ATTEMPTS, RETRY_STATUSES
from stack.tokens import TokenFile

MODEL_API_OFF = ("the management API refuses model changes: start TorchServe with enable_model_api=true "
                 "(./skin up --enable-model-api); keep it on loopback")


class ManagementError(RuntimeError):
    pass


class ClientRetry(Retry):
    """urllib3's Retry as the clients' policy wants it: Retry-After honoured on 507 too (the gate sends it when a
    worker died), and at least 1 s between tries (urllib3 would retry the first time at once)."""

    RETRY_AFTER_STATUS_CODES = frozenset({*Retry.RETRY_AFTER_STATUS_CODES, 507})

    def get_backoff_time(self) -> float:
        return max(1.0, super().get_backoff_time())


# The clients' retry policy: 503 and 507 retried after Retry-After (else 1 s, then 2 s), POST and PUT included:
# a prediction has no side effect worth guarding against a repeat.
RETRY_POLICY = ClientRetry(total=RETRY_ATTEMPTS - 1, connect=0, read=0, status_forcelist=RETRY_STATUSES,
                           allowed_methods=None, backoff_factor=1, respect_retry_after_header=True,
                           raise_on_status=False)


def retrying_session() -> requests.Session:
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=RETRY_POLICY))
    session.mount("https://", HTTPAdapter(max_retries=RETRY_POLICY))
    return session


class TorchServeClient:
    def __init__(self, management_url: str, inference_url: str, tokens: TokenFile | None = None,
                 timeout: float = 30.0):
        self.management_url, self.inference_url = management_url.rstrip("/"), inference_url.rstrip("/")
        self.tokens, self.timeout = tokens, timeout
        self.session = retrying_session()

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return self.tokens.header(kind) if self.tokens else {}

    def call(self, method: str, path: str, timeout: float | None = None, **kw) -> tuple[int, object]:
        """A management call -> (status, JSON body or text)."""
        def once():
            return requests.request(method, self.management_url + path, timeout=timeout or self.timeout,
                                    headers=self.headers("management"), **kw)
        r = once()
        if r.status_code == 400 and "InvalidKeyException" in r.text and self.tokens:
            self.tokens.reload()  # renewed since we read it
            r = once()
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def describe(self, name: str, version: str | None = None) -> list[dict]:
        """[] when the model (version) is not registered or the server does not answer."""
        try:
            status, body = self.call("GET", f"/models/{name}" + (f"/{version}" if version else ""), timeout=5)
        except requests.RequestException:
            return []
        return body if status == 200 and isinstance(body, list) else []

    def workers(self, name: str, version: str | None = None) -> list[dict]:
        return [w for v in self.describe(name, version) for w in v.get("workers", [])]

    def ready_workers(self, name: str, version: str | None = None) -> int:
        return sum(w.get("status") == "READY" for w in self.workers(name, version))

    def default_version(self, name: str) -> str | None:
        """Describing a model without a version describes its default version."""
        found = self.describe(name)
        return found[0]["modelVersion"] if found else None

    def versions(self, name: str) -> list[dict]:
        status, body = self.call("GET", f"/models/{name}/all")
        if status == 405:
            raise ManagementError(MODEL_API_OFF)
        if status != 200:
            raise ManagementError(f"cannot list {name}: HTTP {status} {body}")
        return body

    def register(self, mar_file: str, workers: int) -> None:
        query = urllib.parse.urlencode({"url": mar_file, "initial_workers": workers, "synchronous": "true"})
        status, body = self.call("POST", f"/models?{query}", timeout=300)
        if status == 405:
            raise ManagementError(MODEL_API_OFF)
        if status != 200:
            raise ManagementError(f"registering {mar_file} failed: HTTP {status} {body}")

    def unregister(self, name: str, version: str) -> None:
        status, body = self.call("DELETE", f"/models/{name}/{version}", timeout=120)
        if status not in (200, 404):
            raise ManagementError(f"unregistering {name} {version} failed: HTTP {status} {body}")

    def set_default(self, name: str, version: str) -> None:
        status, body = self.call("PUT", f"/models/{name}/{version}/set-default")
        if status != 200:
            raise ManagementError(f"set-default {name} {version} failed: HTTP {status} {body}")

    def wait_ready(self, names: list[str], version: str | None = None, workers: int = 1, timeout: float = 180.0,
                   alive=lambda: True) -> float:
        """Seconds until every model has `workers` READY workers (not /ping: it says Healthy before any worker
        has loaded and while one crash-loops). alive() False (the server exited) ends the wait at once."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not alive():
                raise ManagementError("TorchServe exited while starting")
            if all(self.ready_workers(n, version) >= workers for n in names):
                return time.monotonic() - started
            time.sleep(0.5)
        raise ManagementError(f"no {workers} READY worker(s) for {', '.join(names)} after {timeout:.0f} s")

    def renew_keys(self) -> None:
        """New inference and management keys; TorchServe rewrites the key file. Needs the API key."""
        for kind in ("inference", "management"):
            r = requests.post(f"{self.management_url}/token?type={kind}", headers=self.headers("API"),
                              timeout=self.timeout)
            if r.status_code != 200:
                raise ManagementError(f"renewing the {kind} key failed: HTTP {r.status_code}")
            self.tokens.reload()

    def predict(self, path: str, data: bytes) -> requests.Response:
        """POST an image to /predictions/... with the clients' retry policy."""
        return self.session.post(self.inference_url + path, data=data, timeout=60, headers=self.headers("inference"))
