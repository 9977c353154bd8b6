"""A Megatec/Q1 UPS emulator on a pseudo-terminal, for the test suite and the demo.

`MegatecUps` is the UPS's side of the protocol (Q1, F, I; see ../shared/CONTEXT.md) without any
transport; `MegatecPty` serves one on a pty so the agent's real serial code (pyserial) talks to
it as to /dev/ttyUSB0. Modes: mains, mains_failure, battery_low, garbled, silent; change them at
runtime with `set_mode`, or single readings with `set` (None gives the `---.-` a UPS sends for a
reading it does not have). POSIX only (os.openpty).
"""

from __future__ import annotations

import collections
import errno
import os
import select
import threading
import tty
from typing import Any

MODES = ("mains", "mains_failure", "battery_low", "garbled", "silent")

# Status bits of the Q1 reply, leftmost (b7) first.
FLAGS = ("on_batt", "batt_low", "bypass", "failed", "standby", "test", "shutdown", "beeper")
READINGS = ("in_v", "in_fault_v", "out_v", "load", "in_hz", "batt_v", "temp")

# A line as a UPS with a bad cable or the wrong baud rate might send it.
GARBLED_LINE = b"(226.0 1\xfe5.0 226.0 014 49.0 27.5 30.0 0000#000\r"


def _preset(mode: str, nominal: float) -> dict[str, Any]:
    """Readings and flags of a 220 V line-interactive UPS with a `nominal` volt battery."""
    base = {"standby": True}
    if mode == "mains":
        return {**base, "in_v": 226.0, "in_fault_v": 195.0, "out_v": 226.0, "load": 14, "in_hz": 50.0,
                "batt_v": nominal * 1.14, "temp": 30.0, "on_batt": False, "batt_low": False, "beeper": False}
    if mode == "mains_failure":
        return {**base, "in_v": 0.0, "in_fault_v": 0.0, "out_v": 220.0, "load": 18, "in_hz": 0.0,
                "batt_v": nominal * 1.03, "temp": 31.0, "on_batt": True, "batt_low": False, "beeper": True}
    if mode == "battery_low":
        return {**base, "in_v": 0.0, "in_fault_v": 0.0, "out_v": 218.0, "load": 18, "in_hz": 0.0,
                "batt_v": nominal * 0.89, "temp": 32.0, "on_batt": True, "batt_low": True, "beeper": True}
    return {}  # garbled and silent keep the readings; only the answers change


def _field(value: float | None, width: int, decimals: int) -> str:
    if value is None:
        text = f"{0:0{width}.{decimals}f}"
        return "".join("." if ch == "." else "-" for ch in text)
    return f"{value:0{width}.{decimals}f}"


class MegatecUps:
    """Answers Megatec commands like a small line-interactive UPS. Thread-safe."""

    def __init__(self, mode: str = "mains", *, vendor: str = "EMULATED UPS", model: str = "MEGA-1000",
                 firmware: str = "EMU-0.1", nominal_batt: float = 24.0, per_cell: bool = False,
                 answers_f: bool = True, answers_i: bool = True, latency: float = 0.0):
        self._lock = threading.Lock()
        self.vendor, self.model, self.firmware = vendor, model, firmware
        self.nominal_batt = nominal_batt
        self.per_cell = per_cell  # report battery volts per cell (2.27) instead of the whole (27.3)
        self.answers_f = answers_f
        self.answers_i = answers_i
        self.latency = latency  # seconds before each answer
        self.failed = self.test = self.shutdown = self.bypass = False
        self.mode = "mains"
        self.values: dict[str, Any] = {}
        self.received: collections.Counter[str] = collections.Counter()
        self.set_mode(mode)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        with self._lock:
            self.mode = mode
            self.values.update(_preset(mode, self.nominal_batt))

    def set(self, **values: Any) -> None:
        """Override readings (in_v, load, batt_v (whole battery), ...) or flags (on_batt, failed, ...)."""
        unknown = set(values) - set(FLAGS) - set(READINGS) - {"vendor", "model", "firmware", "latency"}
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        with self._lock:
            for name in ("vendor", "model", "firmware", "latency"):
                if name in values:
                    setattr(self, name, values.pop(name))
            self.values.update(values)

    def count(self, command: str) -> int:
        with self._lock:
            return self.received[command]

    def q1_line(self) -> bytes:
        v = self.values
        batt = v.get("batt_v")
        if self.per_cell and batt is not None:
            batt_field = _field(batt / (self.nominal_batt / 2), 4, 2)
        else:
            batt_field = _field(batt, 4, 1)
        bits = "".join("1" if v.get(flag) else "0" for flag in FLAGS)
        load = v.get("load")
        parts = [
            _field(v.get("in_v"), 5, 1), _field(v.get("in_fault_v"), 5, 1), _field(v.get("out_v"), 5, 1),
            _field(None if load is None else float(round(load)), 3, 0), _field(v.get("in_hz"), 4, 1),
            batt_field, _field(v.get("temp"), 4, 1), bits,
        ]
        return ("(" + " ".join(parts) + "\r").encode("ascii")

    def reply(self, command: bytes) -> bytes | None:
        """The answer to one command (without its CR), or None for no answer."""
        name = command.strip().decode("latin-1")
        with self._lock:
            self.received[name] += 1
            if self.mode == "silent":
                return None
            if self.mode == "garbled":
                return GARBLED_LINE
            if name == "Q1":
                return self.q1_line()
            if name == "F" and self.answers_f:
                return f"#220.0 000 {self.nominal_batt:05.1f} 50.0\r".encode("ascii")
            if name == "I" and self.answers_i:
                return f"#{self.vendor[:15]:<15} {self.model[:10]:<10} {self.firmware[:10]:<10}\r".encode("ascii")
            return command + b"\r"  # like real units, echo what is not understood


class MegatecPty:
    """Serves a MegatecUps on a pseudo-terminal; `path` is the serial port to open."""

    def __init__(self, ups: MegatecUps):
        self.ups = ups
        self.path = ""
        self._master = self._slave = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "MegatecPty":
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo or line editing before the client sets its own mode
        # Holding the slave open keeps the master readable while the client closes and reopens.
        self.path = os.ttyname(self._slave)
        os.set_blocking(self._master, False)
        self._thread = threading.Thread(target=self._serve, name="megatec-pty", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        pending = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self._master, 1024)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EIO):
                    continue
                raise
            pending += data.replace(b"\n", b"")
            while b"\r" in pending:
                command, _, pending = pending.partition(b"\r")
                answer = self.ups.reply(command)
                if answer is None:
                    continue
                if self.ups.latency and self._stop.wait(self.ups.latency):
                    return
                self._write(answer)
            pending = pending[-256:]  # noise without a CR must not pile up

    def _write(self, data: bytes) -> None:
        try:
            os.write(self._master, data)
        except BlockingIOError:
            pass  # nobody is reading and the pty buffer is full: a real UPS would not wait either

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    def __enter__(self) -> "MegatecPty":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.close()
