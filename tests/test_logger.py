"""The audit trail: spool -> sidecar -> real PostgreSQL (and the SQLite default), nothing lost or doubled."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import pytest
import requests

from skinmodel.audit import AUDIT_UNAVAILABLE, AuditUnavailable, EventSpool, segment_name
from logger.db import Database
from logger.sidecar import Stats, drain_once
from stack.torchserve import TorchServe, free_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get("SKIN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url():
    """A dedicated database on the real PostgreSQL, dropped afterwards."""
    name = f"skin_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(ADMIN_URL)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        ensure_postgres_running()
        admin = psycopg2.connect(ADMIN_URL)
        admin.autocommit = True
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def pg_cluster(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True,
                   capture_output=True, timeout=120)


def ensure_postgres_running() -> None:
    for _ in range(2):
        try:
            psycopg2.connect(ADMIN_URL, connect_timeout=3).close()
            return
        except psycopg2.OperationalError:
            pg_cluster("start")


def event(i: int, **kw) -> dict:
    return {"request_id": f"r{i}", "ts": "2026-01-01T00:00:00.000+00:00", "model_name": "m", "model_version": "1",
            "status": 200, "top_class": "nv", "top_probability": 0.9, "probabilities": {"nv": 0.9, "mel": 0.1}, **kw}


def test_drain_inserts_each_event_once_and_moves_the_offset(pg_url, tmp_path):
    spool = EventSpool(str(tmp_path))
    assert spool.append([event(i) for i in range(5)])
    db = Database(pg_url)
    db.apply_schema()
    db.apply_schema()  # idempotent
    stats = Stats()
    drain_once(db, tmp_path, stats)
    assert db.count() == 5
    spool.append([event(i) for i in range(3, 8)])  # r3, r4 replayed: ignored
    drain_once(db, tmp_path, stats)
    assert db.count() == 8
    (file,) = tmp_path.glob("events-*.jsonl")
    assert db.offsets()[file.name] == file.stat().st_size
    db.write_batch([event(0)], file.name, file.stat().st_size)  # a full replay adds nothing either
    assert db.count() == 8
    assert json.loads(db.query("SELECT probabilities FROM predictions WHERE request_id = 'r1'")[0][0])["nv"] == 0.9


def test_corrupt_line_is_reported_and_skipped(pg_url, tmp_path, caplog):
    name = segment_name("w-1")
    lines = [json.dumps(event(1)), "{not json", json.dumps({"no": "fields"}), json.dumps(event(2))]
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    db = Database(pg_url)
    db.apply_schema()
    stats = Stats()
    drain_once(db, tmp_path, stats)
    assert db.count() == 2 and stats.corrupt == 2
    assert "corrupt spool line" in caplog.text


def test_partial_line_waits_for_its_writer_then_closed_files_are_removed(pg_url, tmp_path):
    live = tmp_path / segment_name("w-2")
    live.write_text(json.dumps(event(1)) + "\n" + json.dumps(event(2))[:20])
    db = Database(pg_url)
    db.apply_schema()
    drain_once(db, tmp_path, Stats())
    assert db.count() == 1 and live.exists()
    old = tmp_path / segment_name("w-3", time.time() - 180)  # a finished minute
    old.write_text(json.dumps(event(3)) + "\n")
    drain_once(db, tmp_path, Stats())
    assert db.count() == 2 and not old.exists() and old.name not in db.offsets()


@pytest.mark.fast
def test_a_spool_that_cannot_be_written_refuses_the_answers(tmp_path):
    """No answer without its audit event: a failed write raises (TorchServe answers the batch 503), whether the
    folder is gone or its file system is below the free-space floor."""
    spool = EventSpool(str(tmp_path / "spool"))
    (tmp_path / "spool").rmdir()
    (tmp_path / "spool").write_text("not a folder any more")
    with pytest.raises(AuditUnavailable) as err:
        spool.append([event(1)])
    assert err.value.error_code == 503 and err.value.message.startswith(AUDIT_UNAVAILABLE) and spool.failures == 1
    floor = EventSpool(str(tmp_path / "full"), min_free_mb=2**40)  # more than any disk has: "full"
    with pytest.raises(AuditUnavailable, match="free"):
        floor.append([event(2)])
    assert not list((tmp_path / "full").iterdir())
    assert EventSpool(None).append([event(3)]) is False  # no spool at all (in-process use): nothing to refuse


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_logs_prune_deletes_only_rows_past_the_retention(engine, request, tmp_path):
    """`./skin logs prune --older-than` (python -m logger prune): the audit trail's retention, on both engines."""
    url = f"sqlite:///{tmp_path / 'p.sqlite3'}" if engine == "sqlite" else request.getfixturevalue("pg_url")
    spool = tmp_path / "spool"
    old = [event(i, ts="2020-01-01T00:00:00.000+00:00") for i in range(25)]
    recent = [event(100 + i, ts=time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime())) for i in range(3)]
    EventSpool(str(spool)).append(old + recent)
    env = {**os.environ, "SKIN_SPOOL_DIR": str(spool), "DATABASE_URL": url}
    assert subprocess.run([sys.executable, "-m", "logger", "run", "--once"], cwd=REPO, env=env,
                          capture_output=True, timeout=120).returncode == 0
    r = subprocess.run([sys.executable, "-m", "logger", "prune", "--older-than", "400d"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "deleted 25 audit row(s)" in r.stdout, r.stdout + r.stderr
    from logger.db import Database

    db = Database(url)
    assert db.count() == 3 and db.prune("2000-01-01T00:00:00.000+00:00", batch=2) == 0
    db.close()
    r = subprocess.run([sys.executable, "-m", "logger", "prune", "--older-than", "soon"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr


@pytest.mark.fast
def test_sqlite_default_through_the_command(tmp_path):
    spool_dir, data = tmp_path / "spool", tmp_path / "data"
    EventSpool(str(spool_dir)).append([event(i) for i in range(4)])
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(SKIN_SPOOL_DIR=str(spool_dir), SKIN_DATA_DIR=str(data))
    r = subprocess.run([sys.executable, "-m", "logger", "run", "--once"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "embedded SQLite" in r.stderr
    r = subprocess.run([sys.executable, "-m", "logger", "stats"], cwd=REPO, env=env, capture_output=True, text=True)
    assert "m 1: 4 requests, 0 rejected" in r.stdout
    r = subprocess.run([sys.executable, "-m", "logger", "show", "--last", "2"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.stdout.count("m 1") == 2


# --- end to end: real TorchServe + sidecar process + real PostgreSQL -------------------------------------

@pytest.fixture
def served(tiny_mar, tmp_path, pg_url):
    spool = tmp_path / "spool"
    ts = TorchServe(tiny_mar.parent, {"skin-lesion": tiny_mar.name}, tmp_path / "ts", free_port(), free_port(),
                    free_port(), env={"SKIN_SPOOL_DIR": str(spool)})
    ts.start()
    try:
        ts.wait_ready(min_workers=2)
        yield ts, spool, pg_url
    finally:
        ts.stop()


def start_sidecar(spool, url) -> subprocess.Popen:
    env = {**os.environ, "SKIN_SPOOL_DIR": str(spool), "DATABASE_URL": url}
    return subprocess.Popen([sys.executable, "-m", "logger", "run", "--interval", "0.2"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def send(ts, payloads, clients=4):
    url = f"{ts.inference_url}/predictions/skin-lesion"
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda d: requests.post(url, data=d, timeout=60, headers=ts.headers()), payloads))


def count_rows(url) -> int:
    try:
        with psycopg2.connect(url, connect_timeout=2) as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM predictions")
            return cur.fetchone()[0]
    except psycopg2.Error:
        return 0


def wait_rows(url, n, timeout=60):
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        try:
            with psycopg2.connect(url, connect_timeout=2) as conn, conn.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM predictions")
                count = cur.fetchone()[0]
            if count >= n:
                time.sleep(1.0)  # and no more than n shows up
                with psycopg2.connect(url) as conn, conn.cursor() as cur:
                    cur.execute("SELECT COUNT(*) FROM predictions")
                    return cur.fetchone()[0]
        except psycopg2.Error:
            pass
        time.sleep(0.3)
    return count


def test_every_prediction_becomes_exactly_one_row(served, sample_images):
    ts, spool, url = served
    sidecar = start_sidecar(spool, url)
    try:
        payloads = [p.read_bytes() for p in sample_images] * 3 + [b"not an image"] * 2
        answers = send(ts, payloads)
        assert wait_rows(url, len(payloads)) == len(payloads)
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            for payload, r in zip(payloads, answers):
                rid = r.json()["request_id"]
                cur.execute("SELECT status, top_class, image_sha256, model_version, probabilities, error_code "
                            "FROM predictions WHERE request_id = %s", (rid,))
                status, top, sha, version, probs, error = cur.fetchone()
                assert status == r.status_code and sha == hashlib.sha256(payload).hexdigest()
                if r.status_code == 200:
                    assert top == r.json()["top"]["code"] and version == r.json()["model"]["version"]
                    assert abs(sum(json.loads(probs).values()) - 1) < 1e-3
                else:
                    assert error == "not_an_image" and top is None
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=20)


def test_explanations_are_audited_with_their_kind(served, sample_images):
    ts, spool, url = served
    sidecar = start_sidecar(spool, url)
    try:
        data = sample_images[0].read_bytes()
        p = requests.post(f"{ts.inference_url}/predictions/skin-lesion", data=data, timeout=60, headers=ts.headers())
        e = requests.post(f"{ts.inference_url}/explanations/skin-lesion", data=data, timeout=60, headers=ts.headers())
        assert p.status_code == e.status_code == 200 and "explanation" in e.json()
        deadline = time.monotonic() + 60
        rows = {}
        while time.monotonic() < deadline and len(rows) < 2:
            try:
                with psycopg2.connect(url) as conn, conn.cursor() as cur:
                    cur.execute("SELECT request_id, kind, top_class, verdict FROM predictions "
                                "WHERE request_id IN (%s, %s)", (p.json()["request_id"], e.json()["request_id"]))
                    rows = {r[0]: r[1:] for r in cur.fetchall()}
            except psycopg2.Error:
                pass  # the sidecar has not created its tables yet
            time.sleep(0.3)
        assert rows[p.json()["request_id"]] == ("prediction", p.json()["top"]["code"], "ok")
        assert rows[e.json()["request_id"]] == ("explanation", e.json()["top"]["code"], "ok")
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=20)


OLD_TABLE = ("CREATE TABLE predictions (request_id TEXT PRIMARY KEY, ts TEXT NOT NULL, model_name TEXT NOT NULL, "
             "model_version TEXT NOT NULL, model_sha256 TEXT, image_sha256 TEXT, image_bytes BIGINT, "
             "image_format TEXT, image_width INTEGER, image_height INTEGER, status INTEGER NOT NULL, "
             "top_class TEXT, top_probability DOUBLE PRECISION, probabilities TEXT, uncertain BOOLEAN, "
             "verdict TEXT, error_code TEXT, error_reason TEXT, latency_ms DOUBLE PRECISION, inserted_at TEXT NOT NULL)")


OLD_ROW = ("INSERT INTO predictions (request_id, ts, model_name, model_version, status, uncertain, verdict, inserted_at) "
           "VALUES ('old', '2026-01-01', 'm', '1', 200, TRUE, 'not_dermoscopy', '2026-01-01')")


@pytest.mark.parametrize("engine", ["postgresql", "sqlite"])
def test_an_older_database_gains_the_new_columns(engine, request, tmp_path):
    """A table created before `kind` and `concern_flagged` existed, with the old `uncertain` column, keeps working:
    apply_schema adds them and renames `uncertain` to `needs_review` keeping its rows (twice is harmless); an event
    spooled by an older handler (with `uncertain`) fills `needs_review`."""
    from logger.db import Database

    if engine == "postgresql":
        url = request.getfixturevalue("pg_url")
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS predictions")
            cur.execute(OLD_TABLE)
            cur.execute(OLD_ROW)
    else:
        url = str(tmp_path / "audit.sqlite3")
        with sqlite3.connect(url) as conn:
            conn.execute(OLD_TABLE)
            conn.execute(OLD_ROW)
    db = Database(url)
    db.apply_schema()
    second = Database(url)  # a second sidecar starting on the migrated table
    second.apply_schema()
    second.close()
    assert db.write_batch([{**event(1), "kind": "explanation", "uncertain": True, "concern_flagged": True}],
                          "events-x-20260101T0000.jsonl", 10) == 1
    rows = db.query("SELECT request_id, kind, needs_review, concern_flagged FROM predictions ORDER BY request_id")
    assert [(r[0], r[1], bool(r[2]), r[3]) for r in rows] == [("old", None, True, None),
                                                                ("r1", "explanation", True, True)]
    assert "uncertain" not in db._columns("predictions")
    db.close()


def test_killing_the_sidecar_mid_stream_loses_and_doubles_nothing(served, sample_images):
    ts, spool, url = served
    sidecar = start_sidecar(spool, url)
    payloads = [p.read_bytes() for p in sample_images] * 40  # a burst that lasts several sidecar passes
    with ThreadPoolExecutor(1) as bg:
        burst = bg.submit(send, ts, payloads, 2)
        deadline = time.monotonic() + 60
        while count_rows(url) < 3 and time.monotonic() < deadline:  # the sidecar is inserting...
            time.sleep(0.05)
        sidecar.send_signal(signal.SIGKILL)  # ... when it is killed
        sidecar.wait()
        at_kill = count_rows(url)
        assert not burst.done() and 3 <= at_kill < len(payloads), (at_kill, "the kill did not come mid-stream")
        assert all(r.status_code == 200 for r in burst.result())
    sidecar = start_sidecar(spool, url)
    try:
        assert wait_rows(url, len(payloads)) == len(payloads)
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=20)


def test_postgres_restart_during_a_burst_loses_and_doubles_nothing(served, sample_images):
    ts, spool, url = served
    sidecar = start_sidecar(spool, url)
    payloads = [p.read_bytes() for p in sample_images] * 4
    try:
        first = send(ts, payloads[:10])
        pg_cluster("stop")
        try:
            second = send(ts, payloads[10:])  # predictions keep working while the database is down
        finally:
            pg_cluster("start")
        assert all(r.status_code == 200 for r in first + second)
        assert wait_rows(url, len(payloads), timeout=90) == len(payloads)
        assert sidecar.poll() is None, "the sidecar died with the database"
    finally:
        ensure_postgres_running()
        sidecar.terminate()
        _, err = sidecar.communicate(timeout=20)
    assert "database unavailable" in err, "the outage was never noticed: the test did not test it"


def test_review_lists_exactly_the_audit_rows_a_clinician_should_see(pg_url, tmp_path):
    """`logs review` against real PostgreSQL: the uncertain and refused answers (not the ok ones, not the
    errors), oldest first, filtered by time and verdict, in every format; bad options are one-line errors."""
    import csv
    import io

    verdicts = ["ok", "uncertain", "not_dermoscopy", "uncertain", "ok", "not_dermoscopy"]
    events = [event(i, ts=f"2026-01-0{i + 1}T12:00:00.000+00:00", verdict=v, image_sha256=f"{i:064x}",
                    top_class=None if v == "not_dermoscopy" else "nv", kind="explanation" if i == 3 else "prediction")
              for i, v in enumerate(verdicts)]
    events.append(event(9, ts="2026-01-02T00:00:00.000+00:00", status=415, error_code="not_an_image",
                        top_class=None, top_probability=None, probabilities=None))
    EventSpool(str(tmp_path)).append(events)
    db = Database(pg_url)
    db.apply_schema()
    drain_once(db, tmp_path, Stats())
    env = {**os.environ, "DATABASE_URL": pg_url}

    def review(*args):
        r = subprocess.run([sys.executable, "-m", "logger", "review", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
        return r.returncode, r.stdout, r.stderr

    code, out, err = review("--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    expected = db.query("SELECT request_id FROM predictions WHERE status = 200 AND verdict IN "
                        "('uncertain', 'not_dermoscopy') ORDER BY ts")
    assert [r["request_id"] for r in rows] == [rid for (rid,) in expected] == ["r1", "r2", "r3", "r5"]
    assert rows[1]["top"] is None and rows[1]["verdict"] == "not_dermoscopy" and rows[2]["kind"] == "explanation"
    assert rows[0]["image_sha256"] == f"{1:064x}" and rows[0]["probabilities"] == {"nv": 0.9, "mel": 0.1}

    code, out, _ = review("--format", "csv", "--since", "2026-01-03T06:00", "--verdict", "not_dermoscopy")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["request_id"] for r in table] == ["r2", "r5"] and table[0]["p_mel"] == "0.1"
    code, out, _ = review("--since", "3650d")
    assert code == 0 and out.count("uncertain") == 2 and "4 answers to review" in out and "r3" in out
    assert all(r["kept_file"] is None for r in rows), "nothing is kept by default"
    kept = tmp_path / "review"
    kept.mkdir(mode=0o700)
    (kept / f"{2:064x}.jpeg").write_bytes(b"...")  # what the opt-in retention would have kept for r2
    env.update(SKIN_REVIEW_DIR=str(kept))  # as ./skin logs passes it, whether or not this shell turns retention on
    code, out, _ = review("--format", "json")
    assert {r["request_id"]: r["kept_file"] for r in json.loads(out)} == {
        "r1": None, "r2": str(kept / f"{2:064x}.jpeg"), "r3": None, "r5": None}
    for bad in (("--since", "last tuesday"), ("--verdict", "maybe")):
        code, out, err = review(*bad)
        assert code != 0 and "Traceback" not in err and err.strip().count("\n") <= 1, err


def test_review_retention_is_off_by_default_private_and_deletes_by_age(tmp_path, monkeypatch):
    """skinmodel/review_store.py, and the sidecar pruning it on its own passes."""
    from logger.sidecar import run
    from skinmodel.review_store import ReviewStore

    monkeypatch.delenv("SKIN_REVIEW_DIR", raising=False)
    monkeypatch.delenv("SKIN_REVIEW_KEEP_DAYS", raising=False)
    assert not ReviewStore.from_env().enabled and ReviewStore.from_env().keep("a" * 64, b"x", "JPEG") is None
    assert not ReviewStore({"SKIN_REVIEW_DIR": str(tmp_path / "r")}.get("SKIN_REVIEW_DIR"), 0).enabled  # 0 days: off
    assert not (tmp_path / "r").exists()

    folder = tmp_path / "review"
    store = ReviewStore(folder, keep_days=2)
    old, fresh = store.keep("a" * 64, _image("JPEG"), "JPEG"), store.keep("b" * 64, _image("PNG"), "PNG")
    assert old.name == "a" * 64 + ".jpg" and fresh.read_bytes().startswith(b"\xff\xd8\xff")
    assert folder.stat().st_mode & 0o777 == 0o700 and old.stat().st_mode & 0o777 == 0o600
    (folder / "notes.txt").write_text("not ours")
    three_days_ago = time.time() - 3 * 86400
    os.utime(old, (three_days_ago, three_days_ago))
    os.utime(folder / "notes.txt", (three_days_ago, three_days_ago))
    # The sidecar's pass prunes without any new upload arriving.
    monkeypatch.setenv("SKIN_REVIEW_DIR", str(folder))
    monkeypatch.setenv("SKIN_REVIEW_KEEP_DAYS", "2")
    run(f"sqlite:///{tmp_path / 'a.sqlite3'}", tmp_path / "spool", once=True)
    assert not old.exists() and fresh.exists() and (folder / "notes.txt").exists()
    assert store.find("b" * 64) == fresh and store.find("a" * 64) is None


def _image(fmt: str, size=(64, 48)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, fmt)
    return buf.getvalue()


@pytest.mark.fast
def test_review_keeps_a_bounded_reencoding_within_a_quota(tmp_path):
    """What is kept is never the raw upload (a 1600x1200 noise PNG of ~6 MB is kept as a 512 px JPEG),
    and a full folder keeps no more (counted), whatever arrives."""
    from PIL import Image

    from skinmodel.review_store import KEEP_SIDE, ReviewStore

    big = _image("PNG", (1600, 1200))
    store = ReviewStore(tmp_path / "review", keep_days=1, max_bytes=10**9, max_files=3)
    kept = store.keep("c" * 64, big, "PNG")
    assert kept is not None and kept.stat().st_size < min(len(big) // 20, 300_000)
    assert max(Image.open(kept).size) == KEEP_SIDE and Image.open(kept).format == "JPEG"
    for i in range(5):
        store.keep(f"{i:064x}", _image("JPEG"), "JPEG")
    assert len(list(store.directory.iterdir())) == 3 and store.full == 3
    small = ReviewStore(tmp_path / "tiny", keep_days=1, max_bytes=1, max_files=100)
    assert small.keep("d" * 64, _image("JPEG"), "JPEG") is not None  # the first one fits under 1 byte used ...
    assert small.keep("e" * 64, _image("JPEG"), "JPEG") is None and small.full == 1  # ... then it is full
    assert store.keep("f" * 64, b"not an image", "JPEG") is None


def test_one_client_cannot_fill_the_review_folder_for_everyone(tmp_path):
    """Each client named by the gate keeps its uploads in its own subfolder, at most its share of the quota (here
    25 % of 8 files: 2); another client is still kept, as are the owner's direct ones; every kept file is found,
    pruned by age and purged, wherever it sits; a name that is not the gate's kind lands at the top, never a path."""
    import os
    import time

    from skinmodel.review_store import ReviewStore

    store = ReviewStore(tmp_path / "review", keep_days=1, max_bytes=10**9, max_files=8, client_share=0.25)
    hog, other = "a1" * 8, "b2" * 8
    kept = [store.keep(f"{i:064x}", _image("JPEG"), "JPEG", client=hog) for i in range(5)]
    assert [k is not None for k in kept] == [True, True, False, False, False] and store.full == 3
    assert store.keep("e" * 64, _image("JPEG"), "JPEG", client=other).parent.name == other
    assert store.keep("f" * 64, _image("JPEG"), "JPEG").parent == store.directory  # the owner's: the whole quota
    assert store.keep("9" * 64, _image("JPEG"), "JPEG", client="../../etc").parent == store.directory
    assert store.find(f"{0:064x}") == kept[0] and store.find("e" * 64).parent.name == other
    assert store.usage() == (sum(p.stat().st_size for p in store.directory.rglob("*.jpg")), 5)
    old = time.time() - 2 * 86400
    os.utime(kept[0], (old, old))
    assert store.prune() == 1 and store.find(f"{0:064x}") is None
    assert store.purge() == 4 and not list(store.directory.rglob("*.jpg"))
    assert not [p for p in store.directory.iterdir() if p.is_dir()], "empty client folders are left behind"
    full = ReviewStore(tmp_path / "full", keep_days=1, max_bytes=10**9, max_files=1, client_share=1.0)
    full.keep("1" * 64, _image("JPEG"), "JPEG")
    assert full.keep("2" * 64, _image("JPEG"), "JPEG", client="c3" * 8) is None
    assert not (full.directory / ("c3" * 8)).exists(), "a folder made for an upload the quota refused"
    (store.directory / ("d4" * 8)).symlink_to(tmp_path)
    assert store.keep("3" * 64, _image("JPEG"), "JPEG", client="d4" * 8) is None and not list(tmp_path.glob("*.jpg"))


def test_two_replicas_sidecars_share_one_database_without_collisions(pg_url, tmp_path):
    """Scale-out (deploy/kserve): each predictor pod has its own spool and sidecar, all write one PostgreSQL.
    Rows are keyed by TorchServe's request id (unique per request); the read positions by spool file name, which
    carries the pod's host name. Both sidecars run at once; a replayed event is inserted once."""
    spools = [tmp_path / "pod-a", tmp_path / "pod-b"]
    writers = []
    for i, spool in enumerate(spools):
        w = EventSpool(str(spool))
        w.writer_id = f"skin-lesion-predictor-{'ab'[i]}-1"  # the pod's host name and its worker pid
        writers.append(w)
    events = {i: [event(0, request_id=f"{uuid.uuid4()}") for _ in range(300)] for i in range(2)}
    sidecars = [start_sidecar(spool, pg_url) for spool in spools]
    try:
        for batch in range(0, 300, 30):  # both pods answering at once, in bursts
            for i, w in enumerate(writers):
                assert w.append(events[i][batch:batch + 30])
        writers[1].append(events[0][:5])  # a replay of rows the other pod already wrote: no double insert
        assert wait_rows(pg_url, 600) == 600
    finally:
        for s in sidecars:
            s.terminate()
        errors = [s.communicate(timeout=30)[1] for s in sidecars]
    assert all("Traceback" not in e for e in errors), errors
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(DISTINCT request_id) FROM predictions")
        assert cur.fetchone()[0] == 600
        cur.execute("SELECT file FROM spool_offsets ORDER BY file")
        files = [f for (f,) in cur.fetchall()]
    assert all("predictor" in f for f in files) and len(set(files)) == len(files)


def test_a_sidecar_never_forgets_another_replicas_read_position(pg_url, tmp_path):
    """The offsets table is shared: a pass over pod A's spool must leave pod B's positions alone (forgetting
    them would make B's sidecar read its whole spool again on every pass)."""
    db = Database(pg_url)
    db.apply_schema()
    for pod in "ab":  # files of a minute far ahead: still open, so never removed during the test
        (tmp_path / pod).mkdir()
        lines = "".join(json.dumps(event(i, request_id=f"{pod}{i}")) + "\n" for i in range(3))
        (tmp_path / pod / f"events-predictor-{pod}-1-20991231T2359.jsonl").write_text(lines)
    a, b = Stats(), Stats()  # each sidecar keeps its own across passes
    drain_once(db, tmp_path / "a", a)
    drain_once(db, tmp_path / "b", b)
    drain_once(db, tmp_path / "a", a)
    assert db.count() == 6
    files = {p: f"events-predictor-{p}-1-20991231T2359.jsonl" for p in "ab"}
    assert set(db.offsets()) == set(files.values())
    # Its own file gone (a crash between unlink and forget): that position, and only that one, is forgotten.
    (tmp_path / "a" / files["a"]).unlink()
    drain_once(db, tmp_path / "a", a)
    assert set(db.offsets()) == {files["b"]}


def test_no_answer_goes_out_when_the_spool_cannot_be_written(served, sample_images):
    """The spool folder replaced by a file (as a full disk or a lost mount would fail the write): the service
    answers a retryable 503 through the gate and TorchServe alike, and nothing it answered is unaudited."""
    from stack.gate import GateThread

    ts, spool, url = served
    image = sample_images[0].read_bytes()
    gate = GateThread(None, ts.inference_url, ts.tokens).start()
    try:
        assert requests.post(gate.url + "/predictions/skin-lesion", data=image, timeout=60).status_code == 200
        shutil.rmtree(spool)
        spool.write_text("the spool's file system failed")
        direct = send(ts, [image, b"not an image"], clients=1)
        assert [r.status_code for r in direct] == [503, 503], [r.text for r in direct]
        r = requests.post(gate.url + "/predictions/skin-lesion", data=image, timeout=60)
        assert r.status_code == 503 and r.json()["error"] == "audit_unavailable" and r.headers["Retry-After"], r.text
        assert "Traceback" not in r.text
        spool.unlink()
        spool.mkdir()
        r = requests.post(gate.url + "/predictions/skin-lesion", data=image, timeout=60)
        assert r.status_code == 200  # the folder back: answers (and their events) again
        assert sum(len(f.read_text().splitlines()) for f in spool.iterdir()) == 1
    finally:
        gate.stop()
