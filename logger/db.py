"""PostgreSQL (DATABASE_URL) or the embedded SQLite default behind the same few calls."""
from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from skinmodel.audit import EVENT_COLUMNS

SCHEMA = (Path(__file__).parent / "schema.sql").read_text()
COLUMNS = (*EVENT_COLUMNS, "inserted_at")  # schema.sql's predictions table, column for column (tested)
# Added after the table's first release; apply_schema adds them to old databases.
ADDED_COLUMNS = (("kind", "TEXT"), ("concern_flagged", "BOOLEAN"))
# Renamed after the table's first release (old name, new name); apply_schema renames them in old databases, and
# events spooled before the rename still fill the new column. "uncertain" was TRUE for not_dermoscopy too.
RENAMED_COLUMNS = (("uncertain", "needs_review"),)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Database:
    """A connection plus the placeholder style; every write goes through write_batch's one transaction."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith(("postgres://", "postgresql://")):
            import psycopg2

            self.kind, self.param = "postgresql", "%s"
            self.conn = psycopg2.connect(url, connect_timeout=5)
        else:
            path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.kind, self.param, self.path = "sqlite", "?", path
            # The audit trail is the owner's alone, whatever the umask of whoever created it first.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(path, 0o600)
            self.conn = sqlite3.connect(path, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")

    def describe(self) -> str:
        if self.kind == "sqlite":
            return f"SQLite {self.path}"
        p = self.conn.get_dsn_parameters()
        return f"PostgreSQL {p.get('host')}:{p.get('port')}/{p.get('dbname')}"

    def apply_schema(self) -> None:
        cur = self.conn.cursor()
        code = "\n".join(line.split("--", 1)[0] for line in SCHEMA.splitlines())  # comments may hold ';'
        for statement in filter(str.strip, code.split(";")):
            cur.execute(statement)
        present = self._rename_columns(self._columns("predictions"))
        for name, sql_type in ADDED_COLUMNS:  # a database made by an older version gains the newer columns
            if name in present:  # nothing to do: no ALTER, so no table lock on every start
                continue
            if self.kind == "postgresql":  # IF NOT EXISTS: two sidecars starting together must not collide
                cur.execute(f"ALTER TABLE predictions ADD COLUMN IF NOT EXISTS {name} {sql_type}")
                continue
            try:  # SQLite has no IF NOT EXISTS for columns: another process may have added it since we looked
                cur.execute(f"ALTER TABLE predictions ADD COLUMN {name} {sql_type}")
            except sqlite3.OperationalError as err:
                if "duplicate column" not in str(err):
                    raise
        self.conn.commit()

    def _rename_columns(self, present: set[str]) -> set[str]:
        """Old column names become the new ones (PostgreSQL and SQLite >= 3.25 both rename in place, keeping the
        rows); a second sidecar that lost the race finds the work done."""
        cur = self.conn.cursor()
        for old, new in RENAMED_COLUMNS:
            if old in present and new not in present:
                try:
                    cur.execute(f"ALTER TABLE predictions RENAME COLUMN {old} TO {new}")
                except Exception:  # noqa: BLE001 - sqlite3's or psycopg2's error: look before deciding
                    self.conn.rollback()
                    if new not in self._columns("predictions"):
                        raise
                self.conn.commit()
        return self._columns("predictions")

    def _columns(self, table: str) -> set[str]:
        cur = self.conn.cursor()
        if self.kind == "sqlite":
            cur.execute(f"PRAGMA table_info({table})")
            return {row[1] for row in cur.fetchall()}
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                    "AND table_schema = current_schema()", (table,))
        return {row[0] for row in cur.fetchall()}

    def offsets(self) -> dict[str, int]:
        cur = self.conn.cursor()
        cur.execute("SELECT file, byte_offset FROM spool_offsets")
        rows = dict(cur.fetchall())
        self.conn.commit()
        return rows

    def write_batch(self, events: list[dict], file: str, offset: int) -> int:
        """Insert events (duplicates ignored) and move the file's offset, atomically. Returns events written."""
        p = self.param
        inserted_at = now()
        rows = [tuple(_value(e, c, inserted_at) for c in COLUMNS) for e in events]
        sql = (f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({', '.join([p] * len(COLUMNS))}) "
               "ON CONFLICT (request_id) DO NOTHING")
        cur = self.conn.cursor()
        try:
            if rows:
                cur.executemany(sql, rows)
            cur.execute(f"INSERT INTO spool_offsets (file, byte_offset, updated_at) VALUES ({p}, {p}, {p}) "
                        "ON CONFLICT (file) DO UPDATE SET byte_offset = excluded.byte_offset, "
                        "updated_at = excluded.updated_at", (file, offset, inserted_at))
            self.conn.commit()
            return len(rows)
        except Exception:
            self.conn.rollback()
            raise

    def forget(self, file: str) -> None:
        cur = self.conn.cursor()
        cur.execute(f"DELETE FROM spool_offsets WHERE file = {self.param}", (file,))
        self.conn.commit()

    def count(self) -> int:
        cur = self.conn.cursor()
        cur.execute("SELECT COUNT(*) FROM predictions")
        return cur.fetchone()[0]

    def prune(self, before: str, batch: int = 10_000) -> int:
        """Delete the audit rows answered before `before` (a UTC timestamp in the trail's text form), in batches
        so a large backlog never holds one long transaction; -> rows deleted."""
        p, deleted = self.param, 0
        while True:
            cur = self.conn.cursor()
            cur.execute(f"DELETE FROM predictions WHERE request_id IN (SELECT request_id FROM predictions "
                        f"WHERE ts < {p} LIMIT {int(batch)})", (before,))
            n = cur.rowcount
            self.conn.commit()
            deleted += max(n, 0)
            if n < batch:
                return deleted

    def query(self, sql: str, args=()) -> list[tuple]:
        cur = self.conn.cursor()
        cur.execute(sql.replace("?", self.param), args)
        rows = cur.fetchall()
        self.conn.commit()
        return rows

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


def _value(event: dict, column: str, inserted_at: str):
    if column == "inserted_at":
        return inserted_at
    value = event.get(column)
    for old, new in RENAMED_COLUMNS:  # an event spooled by an older handler
        if column == new and value is None:
            value = event.get(old)
    if column == "probabilities" and value is not None:
        return json.dumps(value, sort_keys=True)
    return value
