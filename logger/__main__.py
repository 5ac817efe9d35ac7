"""python -m logger [run|status|show|stats|review|prune]: the prediction audit sidecar and its read-outs.

Retention: rows are kept until `prune --older-than` deletes them (./skin logs prune --older-than 400d, e.g.
daily from cron); each row is about 0.6 KB, and the gate's per-client request rate bounds how fast one client
can add them.

Configuration comes from the environment: DATABASE_URL (postgresql://...; without it, the embedded SQLite
file $SKIN_DATA_DIR/predictions.sqlite3) and SKIN_SPOOL_DIR (the folder TorchServe's handler writes to).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from stack.settings import current


def database_url() -> tuple[str, bool]:
    """DATABASE_URL, else the embedded SQLite file (stack/settings.py); and whether it is the embedded one."""
    s = current()
    return s.audit_database, s.database_url is None


def spool_dir() -> Path:
    return current().spool


def cmd_run(args) -> int:
    from logger.sidecar import run

    url, embedded = database_url()
    if embedded:
        logging.getLogger("logger").info("DATABASE_URL is not set: recording predictions in the embedded SQLite "
                                         "file %s", url.removeprefix("sqlite:///"))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stats = run(url, spool_dir(), interval=args.interval, once=args.once, stop=stop)
    logging.getLogger("logger").info("logger stopped: inserted %d, corrupt lines skipped %d", stats.inserted,
                                     stats.corrupt)
    return 0


def _db():
    from logger.db import Database

    db = Database(database_url()[0])
    db.apply_schema()
    return db


def cmd_status(_args) -> int:
    from logger.sidecar import pending

    db = _db()
    info = pending(spool_dir(), db.offsets())
    last = db.query("SELECT MAX(inserted_at) FROM predictions")[0][0]
    print(json.dumps({"database": db.describe(), "rows": db.count(), "last_insert": last,
                      "spool": str(spool_dir()), "pending_events": info["events"], "pending_files": info["files"]},
                     indent=2))
    return 0


def cmd_show(args) -> int:
    db = _db()
    rows = db.query("SELECT ts, model_name, model_version, kind, status, verdict, top_class, top_probability, "
                    "error_code, latency_ms, image_sha256 FROM predictions ORDER BY ts DESC LIMIT ?", (args.last,))
    print(f"{'time (UTC)':24} {'model':22} {'kind':11} {'status':6} {'answer':16} {'p':>6} {'ms':>7}  image sha256")
    for ts, name, version, kind, status, verdict, top, p, err, ms, sha in rows:
        shown = f"{p:6.3f}" if p is not None else "     -"
        said = err or (top if verdict in (None, "ok") else verdict if top is None else f"{top} {verdict}")
        print(f"{ts[:23]:24} {name + ' ' + version:22} {kind or 'prediction':11} {status:<6} {(said or '-')[:16]:16} {shown} "
              f"{ms or 0:7.1f}  {(sha or '-')[:16]}")
    return 0


def cmd_stats(_args) -> int:
    db = _db()
    print("per model version:")
    for name, version, n, errors in db.query(
            "SELECT model_name, model_version, COUNT(*), SUM(CASE WHEN status <> 200 THEN 1 ELSE 0 END) "
            "FROM predictions GROUP BY model_name, model_version ORDER BY model_name, model_version"):
        print(f"  {name} {version}: {n} requests, {errors} rejected")
    print("per verdict:")
    for verdict, n in db.query("SELECT verdict, COUNT(*) FROM predictions WHERE status = 200 GROUP BY verdict "
                               "ORDER BY COUNT(*) DESC"):
        print(f"  {verdict or 'ok':14} {n}")
    print("per top class shown (refused images have none):")
    for top, n in db.query("SELECT top_class, COUNT(*) FROM predictions WHERE status = 200 AND top_class IS NOT NULL "
                           "GROUP BY top_class ORDER BY COUNT(*) DESC"):
        print(f"  {top:6} {n}")
    return 0


def cmd_review(args) -> int:
    from logger.review import parse_since, parse_verdicts, render, review_rows

    since, verdicts = parse_since(args.since), parse_verdicts(args.verdict)
    print(render(review_rows(_db(), since, verdicts), args.format), end="" if args.format == "csv" else "\n")
    return 0


def cmd_prune(args) -> int:
    from logger.review import parse_since

    before = parse_since(args.older_than)
    deleted = _db().prune(before)
    print(f"deleted {deleted} audit row(s) answered before {before}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s logger %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m logger", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="tail the spool into the database (the default command)")
    run.add_argument("--interval", type=float, default=0.5, help="seconds between spool scans")
    run.add_argument("--once", action="store_true", help="drain what is there and exit")
    run.set_defaults(func=cmd_run)
    sub.add_parser("status", help="rows, last insert, events still waiting in the spool").set_defaults(func=cmd_status)
    show = sub.add_parser("show", help="the latest predictions")
    show.add_argument("--last", type=int, default=20)
    show.set_defaults(func=cmd_show)
    sub.add_parser("stats", help="counts per model version and per top class").set_defaults(func=cmd_stats)
    review = sub.add_parser("review", help="answers a clinician should look at (uncertain, not dermoscopy)",
                            description="Answers a clinician should look at, oldest first. Images are never stored: "
                                        "each row names its image by SHA-256.")
    review.add_argument("--since", help="only answers since: 36h, 7d, or a date/time like 2026-11-01 (UTC)")
    review.add_argument("--verdict", default="uncertain,not_dermoscopy",
                        help="comma-separated verdicts to list (default: uncertain,not_dermoscopy)")
    review.add_argument("--format", choices=("table", "csv", "json"), default="table")
    review.set_defaults(func=cmd_review)
    prune = sub.add_parser("prune", help="delete audit rows older than a retention (e.g. --older-than 400d)")
    prune.add_argument("--older-than", required=True, help="a duration like 400d or 36h, or a date like 2026-01-01")
    prune.set_defaults(func=cmd_prune)
    args = p.parse_args(argv)
    if not args.command:
        args = p.parse_args(["run", *(argv or sys.argv[1:])])
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - a read-out command should say what is wrong, not dump a trace
        if args.command == "run":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
