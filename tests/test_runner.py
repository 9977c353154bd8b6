"""The runner on an injected clock: hours of scheduling in milliseconds."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from msgspec import Struct

from agent import wire
from agent.probes.base import Probe, ProbeContext
from agent.runner import InlineExecutor, Runner, Slot

KIT = wire.KitId("sintang", "dedai", "kit-1")


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0):
        self.wall = start
        self.mono = 1000.0

    def time(self):
        return self.wall

    def monotonic(self):
        return self.mono

    def advance(self, seconds: float):
        self.wall += seconds
        self.mono += seconds


class Scripted(Probe):
    """A probe whose next result the test decides."""

    type_name = "scripted"
    entry_type = wire.DeviceEntry

    class Options(Struct):
        pass

    def __init__(self, name, state="ok"):
        super().__init__(name, None, ProbeContext())
        self.state = state
        self.calls = 0
        self.error: Exception | None = None
        self.gate: threading.Event | None = None

    def run(self):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.error:
            raise self.error
        code = "not_detected" if self.state == "missing" else ""
        return wire.DeviceEntry(s=self.state, c=code, serial="SN1")


def make_runner(clock, probes, heartbeat=60, interval=10.0, timeout=5.0, executor=None):
    reports = []
    slots = [Slot(p, interval, timeout) for p in probes]
    runner = Runner(KIT, slots, heartbeat, reports.append, clock=clock, executor=executor or InlineExecutor(),
                    boot="00112233aabbccdd")
    return runner, reports


def drive(runner, clock, seconds, step=1.0):
    """Advance the fake clock in steps, calling the runner as its loop would."""
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        runner.step()
        clock.advance(step)


def test_first_report_once_every_probe_answered():
    clock = FakeClock()
    fp, iris = Scripted("fingerprint"), Scripted("iris")
    runner, reports = make_runner(clock, [fp, iris])
    runner.step()
    assert len(reports) == 1
    report = reports[0]
    assert set(report.p) == {"fingerprint", "iris"}
    assert (report.seq, report.boot, report.hb, report.kit_id) == (1, "00112233aabbccdd", 60, KIT)
    assert report.ts == clock.time()
    # and it is a valid wire message
    assert wire.decode_report(wire.encode(report, compress=True), KIT) == report


def test_heartbeat_cadence_without_changes():
    clock = FakeClock()
    probe = Scripted("fingerprint")
    runner, reports = make_runner(clock, [probe], heartbeat=60, interval=10)
    drive(runner, clock, 3600)
    # one at start, then one per heartbeat: 3600 s -> 60 reports, evenly spaced
    assert len(reports) == 60
    gaps = {round(b.ts - a.ts) for a, b in zip(reports, reports[1:])}
    assert gaps == {60}
    assert [r.seq for r in reports] == list(range(1, 61))
    assert probe.calls == 360  # every 10 s


def test_change_reported_at_once_then_heartbeat_resumes():
    clock = FakeClock()
    probe = Scripted("fingerprint")
    runner, reports = make_runner(clock, [probe], heartbeat=60, interval=2)
    drive(runner, clock, 30)
    assert len(reports) == 1
    probe.state = "missing"
    drive(runner, clock, 2)  # the next probe run sees it
    assert len(reports) == 2
    assert reports[-1].p["fingerprint"].s == "missing"
    assert reports[-1].ts - reports[0].ts <= 32
    drive(runner, clock, 58)  # the change report at t=30 restarts the heartbeat
    assert len(reports) == 2, "no second report for the same state before the heartbeat"
    drive(runner, clock, 2)
    assert len(reports) == 3


def test_change_key_ignores_readings_but_not_state():
    clock = FakeClock()
    probe = Scripted("fingerprint")
    runner, reports = make_runner(clock, [probe], heartbeat=60, interval=1)
    drive(runner, clock, 10)
    probe.state = "error"
    drive(runner, clock, 1)
    probe.state = "ok"
    drive(runner, clock, 1)
    assert [r.p["fingerprint"].s for r in reports] == ["ok", "error", "ok"]


def test_exception_marks_only_that_probe():
    clock = FakeClock()
    good, bad = Scripted("fingerprint"), Scripted("iris")
    bad.error = RuntimeError("usb bus exploded")
    runner, reports = make_runner(clock, [good, bad])
    runner.step()
    entry = reports[0].p["iris"]
    assert (entry.s, entry.c) == ("error", "probe_failed")
    assert "usb bus exploded" in entry.m
    assert reports[0].p["fingerprint"].s == "ok"
    bad.error = None
    drive(runner, clock, 11)
    assert reports[-1].p["iris"].s == "ok"


def test_wrong_return_type_is_an_error_not_a_crash():
    clock = FakeClock()
    probe = Scripted("fingerprint")
    probe.run = lambda: {"s": "ok"}
    runner, reports = make_runner(clock, [probe])
    runner.step()
    assert reports[0].p["fingerprint"].c == "probe_failed"


def test_hung_probe_times_out_and_is_not_started_twice():
    clock = FakeClock()
    hung, fine = Scripted("camera"), Scripted("fingerprint")
    hung.gate = threading.Event()
    pool = ThreadPoolExecutor(max_workers=2)
    runner, reports = make_runner(clock, [hung, fine], interval=10, timeout=5, executor=pool)
    hung_slot, fine_slot = runner.slots

    def settle(slot):  # the probe's real thread has answered (the clock is fake, threads are not)
        if slot.future is not None:
            slot.future.result(timeout=10)

    try:
        runner.step()
        settle(fine_slot)
        runner.step()
        assert reports == []  # waiting for the hung probe's first answer
        clock.advance(5)
        runner.step()
        assert len(reports) == 1
        entry = reports[0].p["camera"]
        assert (entry.s, entry.c) == ("error", "timeout")
        for _ in range(5):  # its interval passes several times while it hangs
            clock.advance(10)
            runner.step()
            settle(fine_slot)
        assert hung.calls == 1, "a hung probe is not piled up on new threads"
        hung.gate.set()
        settle(hung_slot)
        clock.advance(1)
        runner.step()  # collects the late answer; the state change is reported at once
        assert reports[-1].p["camera"].s == "ok"
    finally:
        hung.gate.set()
        pool.shutdown()


def test_queue_stats_travel_in_report():
    clock = FakeClock()
    reports = []
    runner = Runner(KIT, [Slot(Scripted("fingerprint"), 10, 5)], 60, reports.append,
                    queue_stats=lambda: wire.QueueStats(7, 3), clock=clock, executor=InlineExecutor())
    runner.step()
    assert reports[0].q == wire.QueueStats(7, 3)


@pytest.mark.parametrize("stall", [300, 7200])
def test_clock_stall_does_not_cause_a_burst(stall):
    clock = FakeClock()
    probe = Scripted("fingerprint")
    runner, reports = make_runner(clock, [probe], interval=10)
    runner.step()
    clock.advance(stall)  # the PC slept or the process was stopped
    runner.step()
    runner.step()
    assert probe.calls == 2
    assert len(reports) == 2


def test_negative_monotonic_clock_is_fine():
    clock = FakeClock()
    clock.mono = -21600.0  # monotonic time has no fixed origin
    probe = Scripted("fingerprint")
    runner, reports = make_runner(clock, [probe], heartbeat=60, interval=10)
    drive(runner, clock, 120)
    assert probe.calls == 12 and len(reports) == 2
