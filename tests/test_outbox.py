import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from agent.outbox import CACHE_KIB, ROW_OVERHEAD, Outbox
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


def test_page_cache_is_bounded_through_a_long_backlog(tmp_path):
    """SQLite's default page cache (2000 KiB) fills while a backlog drains and stays allocated for
    the life of the agent; the queue's stays within CACHE_KIB. Measured in a fresh process with
    sqlite3_memory_used() of the libsqlite3 that Python's sqlite3 module is linked against."""
    script = textwrap.dedent(f"""
        import ctypes, os, sqlite3, sys
        from agent.outbox import Outbox
        lib = [line.split()[-1] for line in open("/proc/self/maps") if "libsqlite3" in line]
        if not lib:
            print("static"); sys.exit()
        used = ctypes.CDLL(lib[0]).sqlite3_memory_used
        used.restype = ctypes.c_int64
        box = Outbox({str(tmp_path / "q.sqlite")!r}, 64 * 1024 * 1024)
        box._db.execute("PRAGMA synchronous=OFF")  # only to fill it quickly
        ids = [box.put("t", os.urandom(350), float(i)) for i in range(6000)]  # ~2.4 MB, 600+ pages
        cursor, seen = 0, []
        while rows := box.next_after(cursor, limit=20):
            seen.extend(r.id for r in rows)
            box.delete([r.id for r in rows])
            cursor = rows[-1].id
        assert seen == ids and box.count == 0
        print(box._db.execute("PRAGMA cache_size").fetchone()[0], used())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "static":
        pytest.skip("sqlite3 is linked statically into Python here: its memory counter is out of reach")
    cache_size, used = map(int, done.stdout.split())
    assert used < (CACHE_KIB + 256) * 1024, f"SQLite holds {used // 1024} KiB after the backlog"
    assert cache_size == -CACHE_KIB


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
