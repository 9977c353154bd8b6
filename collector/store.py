"""The collector's store: history of changes, the report ledger and kit snapshots, in SQLite.

Used from the ingest worker thread only (writes) and from HTTP threads for reads, each with
its own connection. WAL mode lets readers run while the worker writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import msgspec

from agent import wire
from collector.fleet import Event, KitRecord, Ledger

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    kabupaten TEXT NOT NULL, kecamatan TEXT NOT NULL, kit TEXT NOT NULL,
    kind TEXT NOT NULL, subject TEXT NOT NULL, old TEXT NOT NULL, new TEXT NOT NULL,
    at REAL NOT NULL, agent_ts REAL, replayed INTEGER NOT NULL DEFAULT 0, detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_by_kit ON events (kabupaten, kecamatan, kit, at);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
CREATE TABLE IF NOT EXISTS kits (
    kabupaten TEXT NOT NULL, kecamatan TEXT NOT NULL, kit TEXT NOT NULL,
    record BLOB NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (kabupaten, kecamatan, kit)
);
CREATE TABLE IF NOT EXISTS ledger (
    kabupaten TEXT NOT NULL, kecamatan TEXT NOT NULL, kit TEXT NOT NULL, boot TEXT NOT NULL,
    ranges TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (kabupaten, kecamatan, kit, boot)
);
-- Reports taken since the ledger rows were last written, one row per ingest batch: writing each
-- touched ledger per batch cost an upsert per report. Folded into `ledger` every few seconds.
CREATE TABLE IF NOT EXISTS seen (
    id INTEGER PRIMARY KEY,
    reports BLOB NOT NULL
);
"""

_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(KitRecord)
Seen = tuple[wire.KitId, str, int]  # (kit, boot, seq) of a report taken into the ledger
_seen_encoder = msgspec.msgpack.Encoder()
_seen_decoder = msgspec.msgpack.Decoder(list[tuple[str, str, str, str, int]])


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._connect()
        self._db.executescript(_SCHEMA)
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    # -- writes (ingest worker) ------------------------------------------------------------

    def write(self, events: list[Event], seen: list[Seen], records: list[tuple[wire.KitId, KitRecord]],
              now: float, ledgers: list[tuple[wire.KitId, str, Ledger]] | None = None) -> None:
        """One transaction: history, the reports taken and snapshots land together or not at all.

        `ledgers`, when given, are the full ledgers of every kit run with reports taken since the
        last time they were given: they are written and the `seen` journal is emptied.
        """
        db = self._db
        db.execute("BEGIN")
        try:
            if seen and ledgers is None:
                db.execute("INSERT INTO seen (reports) VALUES (?)",
                           (_seen_encoder.encode([(*kit, boot, seq) for kit, boot, seq in seen]),))
            if events:
                db.executemany(
                    "INSERT INTO events (kabupaten, kecamatan, kit, kind, subject, old, new, at, agent_ts, replayed,"
                    " detail) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [(*e.kit, e.kind, e.subject, e.old, e.new, e.at, e.agent_ts, int(e.replayed), e.detail)
                     for e in events],
                )
            if ledgers:
                db.executemany(
                    "INSERT INTO ledger VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET ranges=excluded.ranges,"
                    " updated=excluded.updated",
                    [(*kit, boot, json.dumps(ledger.ranges, separators=(",", ":")), now)
                     for kit, boot, ledger in ledgers],
                )
            if ledgers is not None:
                db.execute("DELETE FROM seen")
            if records:
                db.executemany(
                    "INSERT INTO kits VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET record=excluded.record,"
                    " updated=excluded.updated",
                    [(*kit, _record_encoder.encode(record), now) for kit, record in records],
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def prune(self, before: float) -> int:
        """Drops history and ledgers of agent runs older than `before`."""
        self._db.execute("DELETE FROM ledger WHERE updated < ?", (before,))
        return self._db.execute("DELETE FROM events WHERE at < ?", (before,)).rowcount

    def writable(self) -> bool:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")
            return True
        except sqlite3.Error:
            return False

    # -- reads -----------------------------------------------------------------------------

    def load_kits(self) -> list[tuple[wire.KitId, KitRecord, dict[str, Ledger]]]:
        ledgers: dict[wire.KitId, dict[str, Ledger]] = {}
        for kab, kec, kit, boot, ranges in self._db.execute(
            "SELECT kabupaten, kecamatan, kit, boot, ranges FROM ledger ORDER BY updated"
        ):
            ledgers.setdefault(wire.KitId(kab, kec, kit), {})[boot] = Ledger(json.loads(ranges))
        for kab, kec, kit, boot, seq in self._seen(self._db):
            ledgers.setdefault(wire.KitId(kab, kec, kit), {}).setdefault(boot, Ledger()).add(seq)
        out = []
        for kab, kec, kit, record in self._db.execute("SELECT kabupaten, kecamatan, kit, record FROM kits"):
            kit_id = wire.KitId(kab, kec, kit)
            out.append((kit_id, _record_decoder.decode(record), ledgers.get(kit_id, {})))
        return out

    def events(self, kit: wire.KitId, limit: int = 200, since: float | None = None) -> list[dict]:
        query = ("SELECT kind, subject, old, new, at, agent_ts, replayed, detail FROM events"
                 " WHERE kabupaten=? AND kecamatan=? AND kit=?")
        args: list = [*kit]
        if since is not None:
            query += " AND at >= ?"
            args.append(since)
        # history in the kit's own order: agent time where known (replays), else receive time
        query += " ORDER BY coalesce(agent_ts, at) DESC, id DESC LIMIT ?"
        args.append(limit)
        rows = self._reader().execute(query, args).fetchall()
        keys = ("kind", "subject", "old", "new", "at", "agent_ts", "replayed", "detail")
        return [dict(zip(keys, row)) | {"replayed": bool(row[6])} for row in rows]

    def ledger(self, kit: wire.KitId) -> dict[str, list[list[int]]]:
        db = self._reader()
        db.execute("BEGIN")  # one read snapshot: a fold between the two reads loses nothing
        try:
            rows = db.execute("SELECT boot, ranges FROM ledger WHERE kabupaten=? AND kecamatan=? AND kit=?"
                              " ORDER BY updated", kit).fetchall()
            ledgers = {boot: Ledger(json.loads(ranges)) for boot, ranges in rows}
            for kab, kec, name, boot, seq in self._seen(db):
                if (kab, kec, name) == kit:
                    ledgers.setdefault(boot, Ledger()).add(seq)
        finally:
            db.execute("COMMIT")
        return {boot: ledger.ranges for boot, ledger in ledgers.items()}

    @staticmethod
    def _seen(db: sqlite3.Connection):
        for (blob,) in db.execute("SELECT reports FROM seen ORDER BY id"):
            yield from _seen_decoder.decode(blob)

    def close(self) -> None:
        self._db.close()
