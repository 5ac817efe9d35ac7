"""Tail the spool folder and move events into the database: exactly once, whatever crashes.

The inserts of a chunk and the new read position of its file commit in one transaction, so after a crash
of the sidecar, TorchServe or the database, reading resumes at the last committed position; request ids are
unique, so even a replayed chunk adds nothing twice. A file is deleted once it is consumed and its minute
has passed (its writer has moved on to a newer file).
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from logger.db import Database, now
from skinmodel.review_store import ReviewStore
from skinmodel.audit import REQUIRED, SEGMENT_GLOB, segment_closed

log = logging.getLogger("logger")
CHUNK_BYTES = 1 << 20


@dataclass
class Stats:
    inserted: int = 0
    corrupt: int = 0
    deleted_files: int = 0
    last_insert: str | None = None
    errors: list = field(default_factory=list)
    seen: set = field(default_factory=set)  # spool file names this sidecar has read (its own, of all that share
    #                                         the offsets table)


def parse_chunk(raw: bytes, file: str, start: int, final: bool, stats: Stats) -> tuple[list[dict], int]:
    """Complete lines of raw -> (events, bytes consumed). A trailing partial line waits for its writer
    unless the file is final (closed), in which case it is reported and skipped."""
    end = raw.rfind(b"\n") + 1
    if final and end < len(raw):
        end = len(raw)
    events, pos = [], 0
    for line in raw[:end].splitlines(keepends=True):
        try:
            event = json.loads(line)
            if not isinstance(event, dict) or any(event.get(k) is None for k in REQUIRED):
                raise ValueError("missing required fields")
            events.append(event)
        except ValueError as exc:
            if line.strip():
                stats.corrupt += 1
                log.warning("skipping corrupt spool line at %s:%d (%s): %r", file, start + pos, exc, line[:120])
        pos += len(line)
    return events, end


def drain_once(db: Database, spool: Path, stats: Stats) -> int:
    """One pass over the spool; returns the number of events written."""
    offsets = db.offsets()
    written = 0
    present = set()
    for path in sorted(spool.glob(SEGMENT_GLOB)):
        present.add(path.name)
        stats.seen.add(path.name)
        offset = offsets.get(path.name, 0)
        size = path.stat().st_size
        closed = segment_closed(path.name)
        while offset < size:
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read(min(CHUNK_BYTES, size - offset))
            events, used = parse_chunk(raw, path.name, offset, closed and offset + len(raw) >= size, stats)
            if used == 0:
                break  # only a partial line from a live writer: wait for the rest
            written += db.write_batch(events, path.name, offset + used)
            offset += used
            if events:
                stats.last_insert = now()
        if closed and offset >= path.stat().st_size:
            path.unlink()
            db.forget(path.name)
            stats.deleted_files += 1
    # A file that went away after a crash between unlink and forget. Only this spool's files: several sidecars
    # (one per replica, each with its own spool) share the offsets table. Ours are those seen in this spool since
    # start, and those named after this host (a Kubernetes pod's containers share one; compose's do not).
    mine = f"events-{socket.gethostname()}-"
    for stale in set(offsets) - present:
        if stale in stats.seen or stale.startswith(mine):
            db.forget(stale)
            stats.seen.discard(stale)
    stats.inserted += written
    return written


def pending(spool: Path, offsets: dict[str, int]) -> dict:
    files = sorted(spool.glob(SEGMENT_GLOB))
    byte_count = sum(max(0, p.stat().st_size - offsets.get(p.name, 0)) for p in files)
    lines = 0
    for p in files:
        with open(p, "rb") as f:
            f.seek(offsets.get(p.name, 0))
            lines += f.read().count(b"\n")
    return {"files": len(files), "bytes": byte_count, "events": lines}


def run(database_url: str, spool: Path, interval: float = 0.5, once: bool = False, report_every: float = 30.0,
        stop: threading.Event | None = None) -> Stats:
    """Connect (retrying), apply the schema, drain until stopped; database outages are waited out, never fatal.
    When `stop` is set, one last drain runs so a clean shutdown leaves nothing waiting."""
    spool.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    stats, db, last_report = Stats(), None, time.monotonic()
    review = ReviewStore.from_env()
    backoff = interval
    while True:
        stopping = stop.is_set()
        try:
            if db is None:
                db = Database(database_url)
                db.apply_schema()
                log.info("logger: %s, spool %s", db.describe(), spool)
            drain_once(db, spool, stats)
            review.prune_if_due()  # opt-in review folder: uploads past their retention go, even when none arrive
            backoff = interval
        except Exception as exc:  # noqa: BLE001 - any DB/IO failure: keep the spool, reconnect later
            log.warning("database unavailable or write failed (%s); retrying in %.1f s, nothing is lost",
                        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, backoff)
            if db is not None:
                db.close()
                db = None
            backoff = min(backoff * 2, 10.0)
            if once:
                raise
        if once or stopping:
            if db:
                db.close()
            return stats
        if time.monotonic() - last_report > report_every and db is not None:
            info = pending(spool, db.offsets())
            log.info("status: %d inserted since start, %d pending in %d file(s), %d corrupt line(s), last insert %s",
                     stats.inserted, info["events"], info["files"], stats.corrupt, stats.last_insert)
            last_report = time.monotonic()
        stop.wait(backoff)
