"""The audit contract: the event every answer leaves behind, and the spool it travels through on its way
to the database. The handler writes (make_event, EventSpool); the logger sidecar reads (segment_closed,
EVENT_COLUMNS, REQUIRED); logger/schema.sql's predictions table holds exactly EVENT_COLUMNS plus its own
inserted_at (tests/test_logger.py checks). An event records who (model and weights hash) said what about
which image (its hash and size, never its pixels).

Spool files are named events-<writer>-<UTC minute>.jsonl. A writer only ever appends to the current minute's
file, so a file whose minute has passed is complete and the sidecar may delete it once consumed. Each batch
is one write() of whole lines with O_APPEND (+ fsync), so readers never see half a batch from a live writer;
a line cut by a crash is reported and skipped by the sidecar. Standard library only (TorchServe's
PredictionException is used when it is there, so a failed write becomes a clean 503 of the batch).

No answer without its audit event: when the spool cannot be written (disk full, quota, folder gone), or its
file system has less free space than SKIN_SPOOL_MIN_FREE_MB (default 64) left, append() raises AuditUnavailable
and the handler's whole batch is answered 503 (retryable) instead; the gate tells the client so.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import datetime, timezone

logger = logging.getLogger(__name__)
AUDIT_UNAVAILABLE = "audit trail unavailable"
DEFAULT_MIN_FREE_MB = 64

try:  # inside a TorchServe worker: its exception carries the HTTP status of the batch's answers
    from ts.utils.util import PredictionException as _Refused
except ImportError:  # pragma: no cover - the logger sidecar and the tools run without TorchServe
    class _Refused(Exception):
        def __init__(self, message, error_code=500):
            super().__init__(message)
            self.message, self.error_code = message, error_code


class AuditUnavailable(_Refused):
    """The events of a batch could not be spooled: its answers must not go out (TorchServe answers 503)."""

    def __init__(self, why: str):
        super().__init__(f"{AUDIT_UNAVAILABLE}: {why}", 503)

EVENT_COLUMNS = ("request_id", "ts", "model_name", "model_version", "model_sha256", "image_sha256", "image_bytes",
                 "image_format", "image_width", "image_height", "status", "top_class", "top_probability",
                 "probabilities", "needs_review", "verdict", "error_code", "error_reason", "latency_ms", "kind",
                 "concern_flagged")
KINDS = ("prediction", "explanation")
REQUIRED = ("request_id", "ts", "model_name", "model_version", "status")
SEGMENT_GLOB = "events-*.jsonl"


def segment_name(writer_id: str, when: float | None = None) -> str:
    return f"events-{writer_id}-{time.strftime('%Y%m%dT%H%M', time.gmtime(when))}.jsonl"


def segment_minute(name: str) -> str | None:
    """'events-host-12-20261125T2130.jsonl' -> '20261125T2130'."""
    minute = name.removesuffix(".jsonl").rsplit("-", 1)[-1]
    return minute if len(minute) == 13 and minute[8] == "T" else None


def segment_closed(name: str, now_epoch: float | None = None) -> bool:
    """Its minute has passed: its writer has moved on, nothing more will be appended."""
    minute = segment_minute(name)
    return minute is not None and minute < time.strftime("%Y%m%dT%H%M", time.gmtime(now_epoch))


def make_event(request_id, meta, model_sha256: str, image: dict, latency_ms: float,
               probabilities=None, error=None, answer: dict | None = None, kind: str = "prediction") -> dict:
    """One audit record (meta: the ReleaseMeta answering; error: the InputError refusing, if any; kind: which
    endpoint answered). The top class is the one the client was shown: none for a not_dermoscopy answer."""
    event = {"request_id": request_id, "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
             "model_name": meta.name, "model_version": meta.version, "model_sha256": model_sha256,
             "image_sha256": image.get("sha256"), "image_bytes": image.get("bytes"),
             "image_format": image.get("format"), "image_width": image.get("width"),
             "image_height": image.get("height"), "latency_ms": round(latency_ms, 2), "kind": kind}
    if error is not None:
        event.update(status=error.status, error_code=error.code, error_reason=error.reason)
    else:
        probs = {c: round(float(p), 6) for c, p in zip(meta.class_names, probabilities)}
        shown = (answer or {}).get("top", {"code": max(probs, key=probs.get)})
        event.update(status=200, probabilities=probs, top_class=shown["code"] if shown else None,
                     top_probability=probs[shown["code"]] if shown else None,
                     needs_review=(answer or {}).get("verdict", "ok") != "ok", verdict=(answer or {}).get("verdict"),
                     concern_flagged=((answer or {}).get("concern") or {}).get("flagged"))
    return event


class EventSpool:
    def __init__(self, directory: str | None, fsync: bool = True, min_free_mb: float = DEFAULT_MIN_FREE_MB):
        self.directory = directory
        self.fsync = fsync
        self.min_free = int(min_free_mb * 2**20)
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}"
        self.failures = 0
        if directory:
            os.makedirs(directory, exist_ok=True)

    @classmethod
    def from_env(cls) -> "EventSpool":
        try:
            floor = float(os.environ.get("SKIN_SPOOL_MIN_FREE_MB") or DEFAULT_MIN_FREE_MB)
        except ValueError:
            floor = DEFAULT_MIN_FREE_MB
        return cls(os.environ.get("SKIN_SPOOL_DIR") or None, os.environ.get("SKIN_SPOOL_FSYNC", "1") != "0", floor)

    def append(self, events: list[dict]) -> bool:
        """Spool the events of one batch; False when there is no spool (in-process use). Raises
        AuditUnavailable when there is one and the events could not be written in full."""
        if not self.directory or not events:
            return False
        data = "".join(json.dumps(e, separators=(",", ":"), allow_nan=False) + "\n" for e in events).encode()
        try:
            free = os.statvfs(self.directory)
            if free.f_bavail * free.f_frsize - len(data) < self.min_free:
                raise OSError(f"less than {self.min_free >> 20} MiB free")
            path = os.path.join(self.directory, segment_name(self.writer_id))
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return True
        except OSError as err:
            self.failures += 1
            logger.error("could not write %d audit event(s) to %s: %s; their answers are refused",
                         len(events), self.directory, err)
            raise AuditUnavailable(err.strerror or str(err)) from None
