"""The host probe on this machine, and the clock-skew check against a real HTTP server."""

import email.utils
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent import wire
from agent.config import convert
from agent.probes.base import ProbeContext
from agent.probes.host import HostOptions, HostProbe, clock_skew
from collector.devbroker import free_port


def probe(**options) -> HostProbe:
    return HostProbe("host", convert(options, HostOptions, "test.yaml"), ProbeContext())


class DateServer:
    """An HTTP server whose clock is `offset` seconds from ours (None: sends no Date)."""

    def __init__(self, offset: float | None):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def date_time_string(self, timestamp=None):
                return email.utils.formatdate(time.time() + (outer.offset or 0), usegmt=True)

            def send_header(self, keyword, value):
                if keyword == "Date" and outer.offset is None:
                    return
                super().send_header(keyword, value)

            def do_HEAD(self):
                self.send_response(404 if self.path == "/missing" else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.offset = offset
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def date_server():
    made = []

    def make(offset):
        server = DateServer(offset)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def test_readings_of_this_machine():
    entry = probe(temperatures=True).run()
    assert entry.s == "ok", entry.m
    assert 0 <= entry.cpu <= 1
    assert 0 < entry.mem_avail <= entry.mem_total
    disk = entry.disks["/"]
    assert 0 < disk.free <= disk.size
    assert entry.boot < time.time()
    assert entry.skew is None, "no reference configured, no skew"
    report = wire.Report(v=1, kab="a", kec="b", kit="c", ts=1.0, boot="00000000", seq=1, hb=60, p={"host": entry})
    assert wire.decode_report(wire.encode(report)).p["host"] == entry


def test_disk_low_is_a_warning_naming_the_mount():
    entry = probe(disk_free_min=1.0).run()
    assert (entry.s, entry.c, entry.m) == ("warn", "disk_low", "/")


def test_unreadable_mount_is_an_error_but_other_readings_remain():
    entry = probe(mounts=["/", "/no/such/mount"]).run()
    assert (entry.s, entry.c) == ("error", "disk_unreadable")
    assert "/no/such/mount" in entry.m
    assert "/" in entry.disks and entry.mem_total


def test_clock_in_step_with_reference(date_server):
    server = date_server(0)
    entry = probe(clock_reference=server.url).run()
    assert entry.s == "ok"
    assert abs(entry.skew) <= 1.5


def test_clock_behind_reference_is_warned(date_server):
    server = date_server(600)  # the server is ten minutes ahead: our clock is behind
    entry = probe(clock_reference=server.url, clock_skew_max=120).run()
    assert (entry.s, entry.c) == ("warn", "clock_skew")
    assert entry.skew == pytest.approx(-600, abs=1.5)


def test_error_page_still_gives_the_time(date_server):
    server = date_server(-3600)
    assert clock_skew(server.url + "missing", timeout=5) == pytest.approx(3600, abs=1.5)


def test_reference_without_date_or_unreachable(date_server):
    server = date_server(None)
    entry = probe(clock_reference=server.url).run()
    assert (entry.s, entry.c) == ("warn", "clock_unchecked")
    assert "Date" in entry.m
    entry = probe(clock_reference=f"http://127.0.0.1:{free_port()}/").run()
    assert (entry.s, entry.c) == ("warn", "clock_unchecked")
    assert entry.skew is None
