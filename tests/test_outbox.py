import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

from agent.outbox import ROW_OVERHEAD, Outbox
from conftest import ROOT, wait_for

TOPIC = "ektp/v1/sintang/dedai/kit-1/report"


def test_put_read_delete_in_order(tmp_path):
    box = Outbox(tmp_path / "q.sqlite", 1024 * 1024)
    ids = [box.put(TOPIC, f"r{i}".encode(), float(i)) for i in range(10)]
    assert box.count == 10
    rows = box.next_after(0, limit=4)
    assert [r.payload for r in rows] == [b"r0", b"r1", b"r2", b"r3"]
    assert [r.id for r in box.next_after(ids[2], upto=ids[5])] == ids[3:6]
    assert [r.id for r in box.next_after(0, skip={ids[0], ids[1]}, limit=2)] == ids[2:4]
    box.delete(ids[:5])
    box.delete(ids[:5])  # twice is harmless
    assert box.count == 5
    assert box.next_after(0, limit=1)[0].payload == b"r5"


def test_survives_reopen(tmp_path):
    path = tmp_path / "q.sqlite"
    box = Outbox(path, 1024 * 1024)
    for i in range(5):
        box.put(TOPIC, b"x" * 100, float(i))
    box.close()
    again = Outbox(path, 1024 * 1024)
    assert again.count == 5
    assert again.size == 5 * (100 + ROW_OVERHEAD)


def test_bound_drops_oldest_and_counts(tmp_path):
    path = tmp_path / "q.sqlite"
    payload = b"p" * 200
    cost = len(payload) + ROW_OVERHEAD
    box = Outbox(path, 10 * cost)
    ids = [box.put(TOPIC, payload, float(i)) for i in range(25)]
    assert box.count == 10
    assert box.size <= box.max_bytes
    assert box.dropped == 15
    assert [r.id for r in box.next_after(0, limit=100)] == ids[-10:], "the newest are kept"
    box.close()
    assert Outbox(path, 10 * cost).dropped == 15, "the drop count is persistent"


def test_uses_wal_and_full_sync(tmp_path):
    box = Outbox(tmp_path / "q.sqlite", 1024 * 1024)
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_kill_9_while_writing_loses_nothing_committed(tmp_path):
    """A writer is killed mid-stream many times; the queue always opens and holds every
    report the writer said it had stored."""
    path = tmp_path / "q.sqlite"
    log = tmp_path / "written.log"
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from agent.outbox import Outbox
        box = Outbox({str(path)!r}, 64 * 1024)
        out = open({str(log)!r}, "a", buffering=1)
        i = 0
        while True:
            rowid = box.put("t", b"x" * 300, 0.0)
            out.write(f"{{rowid}}\\n")
            i += 1
    """)
    for round_ in range(5):
        before = len(log.read_text().split()) if log.exists() else 0
        proc = subprocess.Popen([sys.executable, "-c", writer])
        wait_for(lambda: log.exists() and len(log.read_text().split()) >= before + 50, timeout=20,
                 what="the writer to store reports")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        box = Outbox(path, 64 * 1024)
        assert box._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {r.id for r in box.next_after(0, limit=10_000)}
        acknowledged = [int(x) for x in log.read_text().split()]
        # nothing the writer confirmed is missing except what the bound dropped, oldest first:
        # the queue holds a contiguous run of the newest ids, up to at least the last confirmed
        newest = max(stored)
        assert newest >= max(acknowledged)
        assert stored == set(range(newest - box.count + 1, newest + 1))
        assert box.dropped == newest - box.count
        assert box.size <= box.max_bytes
        box.close()


def test_open_refuses_a_corrupt_file_clearly(tmp_path):
    path = tmp_path / "q.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    try:
        Outbox(path, 1024 * 1024)
    except sqlite3.DatabaseError as exc:
        assert "not a database" in str(exc)
    else:
        raise AssertionError("a corrupt queue must not be used silently")
