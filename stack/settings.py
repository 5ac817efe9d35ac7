"""Every setting of the running service, defined once: defaults here, overridden by SKIN_* environment
variables (read once, by `Settings.from_env`), overridden by command-line flags whose defaults come from here.

Used by ./skin (stack), the gate, the logger, ops, the page build, the benchmarks and the stress runs.
TorchServe's own limits (body size, queue, heap) live in config.properties, which TorchServe reads itself;
the gate's limits are GateLimits in stack/gate.py. Standard library only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from skinmodel.dataset import ham10000_dir  # noqa: F401 - defined once there, re-exported
from skinmodel.release import MODEL_NAME  # noqa: F401
from stack.tokens import KEY_FILE

REPO = Path(__file__).resolve().parents[1]
TORCHSERVE_CONFIG = REPO / "config.properties"
# The clients' retry policy (the page, ops, batch tools): 503 (queue full, restarting) and 507 (worker died)
# are retried after the answer's Retry-After (else 1 s, then 2 s), at most RETRY_ATTEMPTS times in all.
RETRY_STATUSES = (503, 507)
RETRY_ATTEMPTS = 3


def url(port: int, host: str = "127.0.0.1") -> str:
    """The URL a local client uses for a listener (one bound to every address is reached on loopback)."""
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def _env(environ, name: str, default):
    value = environ.get(f"SKIN_{name}")
    if value is None:
        return default
    if isinstance(default, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return type(default)(value) if default is not None else value


@dataclass(frozen=True)
class Settings:
    release_dir: Path = REPO / "release"
    model_store: Path = REPO / "model_store"
    state_dir: Path = REPO / ".stack"
    site_host: str = "127.0.0.1"
    site_port: int = 8000
    inference_host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    enable_model_api: bool = False
    token_auth: bool | None = None  # None: config.properties decides (on)
    database_url: str | None = None  # None: the embedded SQLite file in data_dir
    spool: Path | None = None
    data: Path | None = None
    review_keep_days: float = 0.0  # > 0: keep uncertain/refused uploads that many days for review (opt-in)

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        e = os.environ if environ is None else environ
        d = cls()
        state = Path(_env(e, "STATE_DIR", str(d.state_dir)))
        token = e.get("SKIN_TOKEN_AUTH")
        return cls(release_dir=Path(_env(e, "RELEASE_DIR", str(d.release_dir))),
                   model_store=Path(_env(e, "MODEL_STORE", str(d.model_store))),
                   state_dir=state,
                   site_host=_env(e, "SITE_HOST", d.site_host), site_port=_env(e, "SITE_PORT", d.site_port),
                   inference_host=_env(e, "INFERENCE_HOST", d.inference_host),
                   inference_port=_env(e, "INFERENCE_PORT", d.inference_port),
                   management_port=_env(e, "MANAGEMENT_PORT", d.management_port),
                   metrics_port=_env(e, "METRICS_PORT", d.metrics_port),
                   enable_model_api=_env(e, "ENABLE_MODEL_API", d.enable_model_api),
                   token_auth=None if token is None else token.strip().lower() in ("1", "true", "yes", "on"),
                   database_url=e.get("DATABASE_URL") or None,
                   spool=Path(e.get("SKIN_SPOOL_DIR") or state / "spool"),
                   data=Path(e.get("SKIN_DATA_DIR") or state / "data"),
                   review_keep_days=_env(e, "REVIEW_KEEP_DAYS", d.review_keep_days))

    # Where things are, derived from the above (one rule each).
    @property
    def torchserve_dir(self) -> Path:
        return self.state_dir / "torchserve"

    @property
    def review_dir(self) -> Path:
        return self.state_dir / "review"

    @property
    def key_file(self) -> Path:
        return self.torchserve_dir / KEY_FILE

    @property
    def sqlite_url(self) -> str:
        return f"sqlite:///{(self.data or self.state_dir / 'data') / 'predictions.sqlite3'}"

    @property
    def audit_database(self) -> str:
        return self.database_url or self.sqlite_url

    @property
    def page_url(self) -> str:
        return url(self.site_port, self.site_host)

    @property
    def inference_url(self) -> str:
        return url(self.inference_port, self.inference_host)

    @property
    def management_url(self) -> str:
        return url(self.management_port)

    @property
    def metrics_url(self) -> str:
        return url(self.metrics_port)


def torchserve_config(key: str, base: Path = TORCHSERVE_CONFIG) -> str | None:
    """A setting of config.properties, the one place TorchServe's own limits (body size, queue, heap) are set."""
    for line in base.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and name.strip() == key:
            return value.strip()
    return None


def current() -> Settings:
    return Settings.from_env()


def sample_images(n: int) -> list[bytes]:
    """The first n HAM10000 JPEGs (by name), for benchmarks, canaries and stress runs; [] without the data."""
    root = ham10000_dir()
    return [p.read_bytes() for p in sorted((root / "images").glob("*.jpg"))[:n]] if root else []
