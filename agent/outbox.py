"""Store-and-forward queue: every report is written here first and deleted only after PUBACK.

SQLite in WAL mode with full sync, so a report survives kill -9 and power loss once `put`
returns. The queue is bounded by payload bytes; past the bound the oldest reports are dropped
and counted (the count is kept in the database and travels in every report).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from agent.logutil import RateLimitedLog

log = logging.getLogger("ektp.agent.outbox")

ROW_OVERHEAD = 48  # bytes a row costs besides its payload, roughly; keeps the bound honest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped', 0);
"""


class Row(tuple):
    __slots__ = ()

    @property
    def id(self) -> int:
        return self[0]

    @property
    def topic(self) -> str:
        return self[1]

    @property
    def payload(self) -> bytes:
        return self[2]


class Outbox:
    def __init__(self, path: str | Path, max_bytes: int):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._rlog = RateLimitedLog(log, every=3600.0)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
        ).fetchone()
        self._count = count
        self._bytes = size + count * ROW_OVERHEAD
        self._dropped = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0]

    def put(self, topic: str, payload: bytes, created: float) -> int:
        cost = len(payload) + ROW_OVERHEAD
        with self._lock:
            with self._db:  # one transaction: the insert and any drops land together
                self._db.execute("BEGIN IMMEDIATE")
                dropped = self._make_room(cost)
                rowid = self._db.execute(
                    "INSERT INTO outbox (topic, payload, created) VALUES (?, ?, ?)",
                    (topic, payload, created),
                ).lastrowid
            self._count += 1
            self._bytes += cost
        if dropped:
            self._rlog.warning("full", "queue full (%d bytes): dropping the oldest reports; %d dropped so far",
                               self.max_bytes, self._dropped)
        return rowid

    def _make_room(self, cost: int) -> int:
        dropped = 0
        while self._count and self._bytes + cost > self.max_bytes:
            rows = self._db.execute(
                "SELECT id, length(payload) FROM outbox ORDER BY id LIMIT 64"
            ).fetchall()
            for rowid, size in rows:
                if self._bytes + cost <= self.max_bytes:
                    break
                self._db.execute("DELETE FROM outbox WHERE id=?", (rowid,))
                self._count -= 1
                self._bytes -= size + ROW_OVERHEAD
                dropped += 1
        if dropped:
            self._dropped += dropped
            self._db.execute("UPDATE meta SET value=? WHERE key='dropped'", (self._dropped,))
        return dropped

    def next_after(self, after: int, upto: int | None = None, skip: set[int] | frozenset = frozenset(),
                   limit: int = 16) -> list[Row]:
        """The oldest rows with id > after (and <= upto), leaving out ids in `skip`."""
        query = "SELECT id, topic, payload FROM outbox WHERE id > ?"
        args: list = [after]
        if upto is not None:
            query += " AND id <= ?"
            args.append(upto)
        query += " ORDER BY id LIMIT ?"
        args.append(limit + len(skip))
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [Row(r) for r in rows if r[0] not in skip][:limit]

    def delete(self, rowids: list[int]) -> None:
        if not rowids:
            return
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                for rowid in rowids:
                    row = self._db.execute(
                        "DELETE FROM outbox WHERE id=? RETURNING length(payload)", (rowid,)
                    ).fetchone()
                    if row is not None:
                        self._count -= 1
                        self._bytes -= row[0] + ROW_OVERHEAD

    def max_id(self) -> int:
        with self._lock:
            return self._db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]

    @property
    def count(self) -> int:
        return self._count

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def size(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()
