"""The review queue: the answers a clinician should look at (by default `uncertain` and `not_dermoscopy`), read
from the audit trail. Each row names its image by SHA-256: images are not stored, so the reviewer finds the file
in their own archive (the CSV of ./skin predict has the same column), unless the opt-in retention
(SKIN_REVIEW_KEEP_DAYS, skinmodel/review_store.py) kept it: then its path is given.

    ./skin logs review [--since 7d | --since 2026-11-01] [--verdict uncertain,not_dermoscopy] [--format csv|json]
"""
from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime, timedelta, timezone

from skinmodel.review_store import ReviewStore

REVIEW_VERDICTS = ("uncertain", "not_dermoscopy")
FIELDS = ("time", "request_id", "kind", "model_version", "image_sha256", "verdict", "top", "top_probability",
          "probabilities")


class ReviewError(ValueError):
    pass


def parse_since(text: str | None, now: datetime | None = None) -> str | None:
    """'36h', '7d' (before now) or an ISO date/time (UTC unless it says otherwise) -> the audit trail's form of
    a UTC timestamp, which orders as text."""
    if not text:
        return None
    now = now or datetime.now(timezone.utc)
    m = re.fullmatch(r"\s*(\d+)\s*([hd])\s*", text)
    if m:
        moment = now - timedelta(**{"hours" if m.group(2) == "h" else "days": int(m.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ReviewError(f"--since {text!r}: give a duration like 36h or 7d, or a date like 2026-11-01") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def parse_verdicts(text: str) -> tuple[str, ...]:
    verdicts = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in verdicts if v not in ("ok", *REVIEW_VERDICTS)]
    if unknown or not verdicts:
        raise ReviewError(f"--verdict takes a comma-separated list of ok, uncertain, not_dermoscopy (got {text!r})")
    return verdicts


def review_rows(db, since: str | None = None, verdicts=REVIEW_VERDICTS) -> list[dict]:
    """Answered requests (status 200) with one of the verdicts, oldest first."""
    sql = ("SELECT ts, request_id, kind, model_version, image_sha256, verdict, top_class, top_probability, "
           f"probabilities FROM predictions WHERE status = 200 AND verdict IN ({','.join('?' * len(verdicts))})")
    args = list(verdicts)
    if since:
        sql += " AND ts >= ?"
        args.append(since)
    rows = db.query(sql + " ORDER BY ts, request_id", tuple(args))
    kept = ReviewStore.from_env()  # the opt-in folder of kept uploads, if ./skin up keeps any
    out = []
    for ts, rid, kind, version, sha, verdict, top, p, probs in rows:
        row = dict(zip(FIELDS, (ts, rid, kind or "prediction", version, sha, verdict, top, p,
                                json.loads(probs) if probs else {})))
        path = kept.find(sha)
        row["kept_file"] = str(path) if path else None
        out.append(row)
    return out


def render(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1)
    classes = sorted({c for r in rows for c in r["probabilities"]})
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow([*FIELDS[:-1], "kept_file", *(f"p_{c}" for c in classes)])
        for r in rows:
            w.writerow([*(r[f] for f in FIELDS[:-1]), r["kept_file"] or "", *(r["probabilities"].get(c) for c in classes)])
        return out.getvalue()
    lines = [f"{'time (UTC)':24} {'verdict':15} {'top':5} {'p':>6}  {'image sha256':16}  request id"]
    for r in rows:
        p = "     -" if r["top_probability"] is None else f"{r['top_probability']:6.3f}"
        lines.append(f"{r['time'][:23]:24} {r['verdict']:15} {r['top'] or '-':5} {p}  {(r['image_sha256'] or '-')[:16]}  "
                     f"{r['request_id']}" + (f"  {r['kept_file']}" if r["kept_file"] else ""))
    kept = sum(1 for r in rows if r["kept_file"])
    lines.append(f"{len(rows)} answers to review; " + (f"{kept} of their images kept (SKIN_REVIEW_KEEP_DAYS)" if kept else
                 "images are not stored: find them by SHA-256"))
    return "\n".join(lines)
