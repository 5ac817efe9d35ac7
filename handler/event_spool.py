"""Durable, non-blocking audit events: the handler appends JSON lines to a spool folder, the logger sidecar
(python -m logger) moves them into the database. Flat inside a .mar; standard library only.

Files are named events-<writer>-<UTC minute>.jsonl. A writer only ever appends to the current minute's
file, so a file whose minute has passed is complete and the sidecar may delete it once consumed. Each
batch is one write() of whole lines with O_APPEND (+ fsync), so readers never see half a batch from a
live writer; a line cut by a crash is reported and skipped by the sidecar.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time

logger = logging.getLogger(__name__)


def segment_name(writer_id: str, when: float | None = None) -> str:
    return f"events-{writer_id}-{time.strftime('%Y%m%dT%H%M', time.gmtime(when))}.jsonl"


class EventSpool:
    def __init__(self, directory: str | None, fsync: bool = True):
        self.directory = directory
        self.fsync = fsync
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}"
        self.failures = 0
        if directory:
            os.makedirs(directory, exist_ok=True)

    @classmethod
    def from_env(cls) -> "EventSpool":
        return cls(os.environ.get("SKIN_SPOOL_DIR") or None, os.environ.get("SKIN_SPOOL_FSYNC", "1") != "0")

    def append(self, events: list[dict]) -> bool:
        """Never raises: a full disk or a missing folder must not fail a prediction. Returns success."""
        if not self.directory or not events:
            return False
        try:
            data = "".join(json.dumps(e, separators=(",", ":"), allow_nan=False) + "\n" for e in events).encode()
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
        except Exception:  # noqa: BLE001 - the audit trail is best effort from the handler's side
            self.failures += 1
            logger.exception("could not write %d audit event(s) to %s", len(events), self.directory)
            return False
