"""Runs the probes on their intervals and decides when a report goes out.

A report goes out at once when any probe's change key differs from what was last reported
(ok -> missing, a link target down, ...), and otherwise once per heartbeat. Probes run on
worker threads with a timeout; a probe that raises or hangs is reported as `error` and the
others carry on. Time comes from an injected clock so tests can drive hours in milliseconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Callable

from agent import wire
from agent.identity import DEFAULT_REFRESH, IdentityTracker
from agent.probes.base import Probe

log = logging.getLogger("ektp.agent.runner")


class Clock:
    """Wall time for timestamps, monotonic time for scheduling."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class InlineExecutor(Executor):
    """Runs a submitted call at once on the caller's thread (for `check` and tests)."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the runner like a worker's
            future.set_exception(exc)
        return future


def new_boot_id() -> str:
    return os.urandom(8).hex()


class Slot:
    """One probe's schedule and latest result."""

    def __init__(self, probe: Probe, interval: float, timeout: float):
        self.probe = probe
        self.interval = interval
        self.timeout = timeout
        self.next_due: float | None = None  # None: never run (monotonic time may be negative)
        self.future: Future | None = None
        self.started = 0.0
        self.timed_out = False
        self.latest: wire.Entry | None = None
        self.reported_key: tuple | None = None


def run_safely(probe: Probe) -> wire.Entry:
    """Calls probe.run and turns anything it raises into an error entry."""
    try:
        entry = probe.run()
        if not isinstance(entry, probe.entry_type):
            raise TypeError(f"returned {type(entry).__name__}, expected {probe.entry_type.__name__}")
        return entry
    except Exception as exc:  # noqa: BLE001 - one broken probe must not stop the others
        log.warning("probe %s failed: %s: %s", probe.name, type(exc).__name__, exc)
        return probe.failed("probe_failed", f"{type(exc).__name__}: {exc}")


class Runner:
    def __init__(
        self,
        kit: wire.KitId,
        slots: list[Slot],
        heartbeat: int,
        emit: Callable[[wire.Report], None],
        queue_stats: Callable[[], wire.QueueStats | None] = lambda: None,
        clock: Clock | None = None,
        executor: Executor | None = None,
        boot: str | None = None,
        identity_refresh: float = DEFAULT_REFRESH,
    ):
        self.kit = kit
        self.slots = slots
        self.heartbeat = heartbeat
        self.emit = emit
        self.queue_stats = queue_stats
        self.clock = clock or Clock()
        self.executor = executor or ThreadPoolExecutor(
            max_workers=max(1, len(slots)), thread_name_prefix="probe"
        )
        self.boot = boot or new_boot_id()
        self.seq = 0
        self.identity = IdentityTracker(identity_refresh)  # device identities sent in full or by idref
        self.last_report = None  # monotonic time of the last report
        self.wake = threading.Event()

    # -- one scheduling step -----------------------------------------------------------------

    def step(self) -> float:
        """Start due probes, collect results, emit a report if needed.

        Returns the number of seconds until something is next due.
        """
        now = self.clock.monotonic()
        for slot in self.slots:
            self._collect(slot, now)
            if slot.future is None and (slot.next_due is None or now >= slot.next_due):
                self._start(slot, now)
                self._collect(slot, now)  # an inline executor has finished already
        if all(slot.latest is not None for slot in self.slots):
            changed = any(slot.probe.change_key(slot.latest) != slot.reported_key for slot in self.slots)
            heartbeat_due = self.last_report is None or now - self.last_report >= self.heartbeat
            if changed or heartbeat_due:
                self._report(now)
        return max(0.0, self._next_event(now) - now)

    def _start(self, slot: Slot, now: float) -> None:
        slot.started = now
        slot.timed_out = False
        slot.future = self.executor.submit(run_safely, slot.probe)
        slot.future.add_done_callback(lambda _f: self.wake.set())
        # keep a steady cadence; after a long stall, start again from now
        slot.next_due = now + slot.interval if slot.next_due is None else slot.next_due + slot.interval
        if slot.next_due <= now:
            slot.next_due = now + slot.interval

    def _collect(self, slot: Slot, now: float) -> None:
        future = slot.future
        if future is None:
            return
        if future.done():
            slot.future = None
            try:
                slot.latest = future.result()
            except Exception as exc:  # noqa: BLE001 - run_safely already catches; belt and braces
                slot.latest = slot.probe.failed("probe_failed", str(exc))
        elif not slot.timed_out and now - slot.started >= slot.timeout:
            # The worker thread cannot be killed; keep the future so the probe is not started
            # again until it returns, and report it as failing meanwhile.
            slot.timed_out = True
            log.warning("probe %s did not finish within %.1f s", slot.probe.name, slot.timeout)
            slot.latest = slot.probe.failed("timeout", f"no result after {slot.timeout:g} s")

    def _next_event(self, now: float) -> float:
        times = []
        for slot in self.slots:
            if slot.future is None:
                times.append(now if slot.next_due is None else slot.next_due)
            elif not slot.timed_out:
                times.append(slot.started + slot.timeout)
        if self.last_report is not None:
            times.append(self.last_report + self.heartbeat)
        return min(times, default=now + self.heartbeat)

    def _report(self, now: float) -> None:
        self.seq += 1
        report = wire.Report(
            v=wire.SCHEMA_VERSION,
            kab=self.kit.kabupaten,
            kec=self.kit.kecamatan,
            kit=self.kit.kit,
            ts=round(self.clock.time(), 3),
            boot=self.boot,
            seq=self.seq,
            hb=self.heartbeat,
            p={slot.probe.name: self.identity.apply(slot.probe.name, slot.latest, self.seq, now)
               for slot in self.slots},
            q=self.queue_stats(),
        )
        for slot in self.slots:
            slot.reported_key = slot.probe.change_key(slot.latest)
        self.last_report = now
        self.emit(report)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            delay = self.step()
            self.wake.clear()
            if any(slot.future is not None and slot.future.done() for slot in self.slots):
                continue
            # wake early when a probe finishes or stop is requested
            self.wake.wait(timeout=min(delay, 1.0) if delay > 0 else 0.01)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        for slot in self.slots:
            try:
                slot.probe.close()
            except Exception:  # noqa: BLE001
                log.exception("closing probe %s", slot.probe.name)
