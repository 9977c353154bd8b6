"""The running agent: probes -> runner -> outbox -> publisher, wired from a loaded config."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from agent import probes, wire
from agent.config import LoadedConfig
from agent.mqtt import Publisher
from agent.outbox import Outbox
from agent.probes.base import ProbeContext
from agent.runner import Clock, Runner, Slot, new_boot_id

log = logging.getLogger("ektp.agent")


def hold_lock(path: Path):
    """One agent per state directory: two would fight over the queue and the client id."""
    try:
        handle = open(path, "a+")
    except OSError as exc:
        if not path.exists():
            log.warning("cannot create %s (%s); running without the one-agent-per-directory lock",
                        path, exc.strerror)
            return None
        handle = open(path)  # a read-only file system still allows a lock on a file opened for reading
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SystemExit(f"another ektp-agent is already running with state_dir {path.parent}") from None
    return handle  # the lock lasts as long as this handle stays open


def probe_context(config: LoadedConfig) -> ProbeContext:
    from agent.probes.usb import ListingCache

    return ProbeContext(sysfs_root=config.raw.paths.sysfs, dev_root=config.raw.paths.dev,
                        usb_listing=ListingCache())


def build_slots(config: LoadedConfig, context: ProbeContext) -> list[Slot]:
    return [Slot(probes.create(spec, context), spec.interval, spec.timeout) for spec in config.probes]


class Agent:
    def __init__(self, config: LoadedConfig, context: ProbeContext | None = None, clock: Clock | None = None):
        self.config = config
        self.clock = clock or Clock()
        self.kit = config.raw.kit.kit_id()
        self.boot = new_boot_id()
        self.stop_event = threading.Event()
        state_dir = Path(config.state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"{config.path}: state_dir: cannot create {state_dir}: {exc.strerror}") from None
        self._lock = hold_lock(state_dir / "agent.lock")
        self.outbox = Outbox(state_dir / "outbox.sqlite", config.queue_max_bytes)
        self.report_topic = wire.topic(self.kit, "report")
        self.publisher = Publisher(config, self.kit, self.boot, config.raw.heartbeat, self.outbox, self.clock)
        self.runner = Runner(
            self.kit,
            build_slots(config, context or probe_context(config)),
            config.raw.heartbeat,
            emit=self._enqueue,
            queue_stats=lambda: wire.QueueStats(self.outbox.count, self.outbox.dropped, self.outbox.problem),
            clock=self.clock,
            boot=self.boot,
            identity_refresh=config.raw.identity_refresh,
        )

    def _enqueue(self, report: wire.Report) -> None:
        payload = wire.encode(report, compress=self.config.raw.broker.compress)
        try:
            rowid = self.outbox.put(self.report_topic, payload, report.ts)
        except Exception:  # noqa: BLE001 - the runner must keep probing whatever the disk does
            log.exception("cannot store report %d in %s", report.seq, self.outbox.path)
            return
        log.debug("report %d queued (%d bytes, %d waiting)", report.seq, len(payload), self.outbox.count)
        self.publisher.notify(rowid)

    def run(self) -> None:
        log.info(
            "agent %s starting: kit %s, %d probes, heartbeat %d s, broker %s:%d%s",
            self.boot, self.kit, len(self.runner.slots), self.config.raw.heartbeat,
            self.config.broker.host, self.config.broker.port, " (TLS)" if self.config.broker.tls else "",
        )
        self.publisher.start()
        try:
            self.runner.run(self.stop_event)
        finally:
            self.publisher.stop()
            self.runner.close()
            self.outbox.close()
            log.info("agent stopped")

    def stop(self) -> None:
        self.stop_event.set()
        self.runner.wake.set()

    def install_signal_handlers(self) -> None:
        for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, lambda *_: self.stop())
