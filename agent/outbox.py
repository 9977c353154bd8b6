"""Store-and-forward queue: every report is written here first and deleted only after PUBACK.

SQLite in WAL mode with full sync, so a report survives kill -9 and power loss once `put`
returns. The queue is bounded by payload bytes; past the bound the oldest reports are dropped
and counted (the count is kept in the database and travels in every report).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from agent.logutil import RateLimitedLog

log = logging.getLogger("ektp.agent.outbox")

ROW_OVERHEAD = 48  # bytes a row costs besides its payload, roughly; keeps the bound honest
MEMORY_MAX_BYTES = 4 * 1024 * 1024  # held in memory while the disk refuses writes
DISK_RETRY = 10.0  # seconds between attempts to write to a disk that refused
# SQLite's page cache, in KiB (PRAGMA cache_size, negative = KiB). The queue is appended at one end
# and read and deleted at the other, a dozen pages in all; SQLite's default of 2000 KiB fills up
# while a long backlog is sent after an outage and stays allocated for the life of the agent.
CACHE_KIB = 256

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
        self._db: sqlite3.Connection | None = None
        self._count = self._bytes = self._dropped = 0
        self._problem = ""
        self._failed_at = 0.0
        self._memory: dict[int, tuple[str, bytes, int]] = {}  # negative id -> (topic, payload, cost)
        self._memory_seq = 0
        self._memory_total = 0
        self.memory_max_bytes = min(max_bytes, MEMORY_MAX_BYTES)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise  # a corrupt queue needs a person, not a silent fallback
            self._disk_failed(exc)
        except OSError as exc:
            self._disk_failed(exc)

    def _open(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            db.executescript(_SCHEMA)
            count, size = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
            dropped = db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0]
        except BaseException:
            db.close()
            raise
        self._db = db
        self._count = count + len(self._memory)
        self._bytes = size + count * ROW_OVERHEAD + self._memory_total
        self._dropped = max(self._dropped, dropped)

    def put(self, topic: str, payload: bytes, created: float) -> int:
        """Stores a report; returns its id. If the disk refuses (full, read-only, failing), the
        report is kept in memory instead (negative id) and `problem` says why."""
        cost = len(payload) + ROW_OVERHEAD
        with self._lock:
            if self._problem and time.monotonic() - self._failed_at < DISK_RETRY:
                return self._put_memory(topic, payload, cost)
            try:
                if self._db is None:
                    self._open()
                with self._db:  # one transaction: the insert and any drops land together
                    self._db.execute("BEGIN IMMEDIATE")
                    freed = self._make_room(cost)
                    rowid = self._db.execute(
                        "INSERT INTO outbox (topic, payload, created) VALUES (?, ?, ?)",
                        (topic, payload, created),
                    ).lastrowid
                    if freed:
                        self._db.execute("UPDATE meta SET value=? WHERE key='dropped'", (self._dropped + len(freed),))
            except (sqlite3.Error, OSError) as exc:
                self._disk_failed(exc)
                return self._put_memory(topic, payload, cost)
            if self._problem:
                log.warning("the report queue %s is writable again", self.path)
                self._problem = ""
            self._count += 1 - len(freed)
            self._bytes += cost - sum(size + ROW_OVERHEAD for size in freed)
            self._dropped += len(freed)
        if freed:
            self._rlog.warning("full", "queue full (%d bytes): dropping the oldest reports; %d dropped so far",
                               self.max_bytes, self._dropped)
        return rowid

    def _disk_failed(self, exc: Exception) -> None:
        text = str(exc).lower()
        if "full" in text:
            problem = "disk_full"
        elif "readonly" in text or "read-only" in text or not os.access(self.path.parent, os.W_OK):
            problem = "read_only"
        else:
            problem = "io_error"
        self._rlog.warning(problem, "cannot write the report queue %s (%s): keeping reports in memory until the "
                           "disk accepts them again", self.path, exc)
        self._problem = problem
        self._failed_at = time.monotonic()

    def _put_memory(self, topic: str, payload: bytes, cost: int) -> int:
        self._memory_seq -= 1
        self._memory[self._memory_seq] = (topic, payload, cost)
        self._memory_total += cost
        self._count += 1
        self._bytes += cost
        while self._memory_total > self.memory_max_bytes and len(self._memory) > 1:
            oldest = next(iter(self._memory))
            self._forget(oldest)
            self._dropped += 1
        return self._memory_seq

    def _forget(self, rowid: int) -> None:
        entry = self._memory.pop(rowid, None)
        if entry is not None:
            self._memory_total -= entry[2]
            self._count -= 1
            self._bytes -= entry[2]

    def memory_rows(self, skip: set[int] | frozenset = frozenset(), limit: int = 16) -> list[Row]:
        """Reports held in memory because the disk refused them, oldest first."""
        with self._lock:
            rows = [Row((rowid, topic, payload)) for rowid, (topic, payload, _) in self._memory.items()
                    if rowid not in skip]
        return rows[:limit]

    @property
    def problem(self) -> str:
        """"" when the queue is on disk; otherwise why it is not (disk_full, read_only, io_error)."""
        return self._problem

    def _make_room(self, cost: int) -> list[int]:
        """Deletes the oldest rows until `cost` fits; returns their payload sizes."""
        freed: list[int] = []
        count, size = self._count, self._bytes
        while count and size + cost > self.max_bytes:
            rows = self._db.execute(
                "SELECT id, length(payload) FROM outbox ORDER BY id LIMIT 64"
            ).fetchall()
            if not rows:
                break
            for rowid, length in rows:
                if size + cost <= self.max_bytes:
                    break
                self._db.execute("DELETE FROM outbox WHERE id=?", (rowid,))
                freed.append(length)
                count -= 1
                size -= length + ROW_OVERHEAD
        return freed

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
            if self._db is None:
                return []
            rows = self._db.execute(query, args).fetchall()
        return [Row(r) for r in rows if r[0] not in skip][:limit]

    def delete(self, rowids: list[int]) -> None:
        with self._lock:
            for rowid in [r for r in rowids if r < 0]:
                self._forget(rowid)
            rowids = [r for r in rowids if r > 0]
            if not rowids or self._db is None:
                return
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
            if self._db is None:
                return 0
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
            if self._db is not None:
                self._db.close()
