"""ups: the kit's UPS, over Megatec/Q1 serial, a NUT upsd or an apcupsd NIS server.

The protocol parsers (parse_q1, parse_f, parse_i, parse_nut_vars, parse_apcupsd_status) are pure
functions; the probe only moves bytes. A UPS that does not answer, or answers nonsense, gives an
`error` entry with a reason code, never an exception.

Battery charge over Megatec is an ESTIMATE: Q1 reports only the battery voltage, so the charge is
placed linearly between a low and a high voltage, as NUT's blazer/nutdrv_qx drivers do (defaults
104/120 and 130/120 of the nominal voltage from the `F` reply). Voltage sags under load and rises
while charging, so read it as a rough guide, not a fuel gauge.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Iterable, Literal

from msgspec import Meta, Struct

from agent import wire
from agent.probes.base import Probe

if TYPE_CHECKING:
    import serial  # pyserial is imported by the megatec driver only: NUT and apcupsd are TCP

log = logging.getLogger("ektp.agent.probes.ups")

NUT_PORT = 3493
APCUPSD_PORT = 3551
# Below this a battery voltage (reading or setting) is per cell; a lead-acid cell is nominally 2 V.
PER_CELL_MAX = 3.0
# NUT blazer's "guesstimation" when no battery.voltage.low/high is configured.
DEFAULT_LOW_OF_NOMINAL = 104 / 120
DEFAULT_HIGH_OF_NOMINAL = 130 / 120
# NUT blazer's candidates for "how many reported volts make the battery": per cell, per 12 V block...
_PACKS = (120, 100, 80, 60, 48, 36, 30, 24, 18, 12, 8, 6, 4, 3, 2, 1, 0.5)

Volts = Annotated[float, Meta(gt=0, le=1000)]

# Which options belong to which driver; setting another driver's option is a config mistake.
_DRIVER_FIELDS = MappingProxyType({
    "megatec": frozenset({"port", "baud", "battery_high", "battery_low", "battery_nominal", "reply_timeout"}),
    "nut": frozenset({"host", "port", "ups", "username", "password_file", "reply_timeout"}),
    "apcupsd": frozenset({"host", "port", "reply_timeout"}),
})


class UpsOptions(Struct, forbid_unknown_fields=True):
    driver: Literal["megatec", "nut", "apcupsd"] = "megatec"
    # megatec: the serial port (/dev/ttyUSB0, COM3, or a pyserial URL); nut/apcupsd: the TCP port.
    port: str | int | None = None
    baud: Annotated[int, Meta(ge=300, le=115200)] = 2400
    # Battery voltages for the charge estimate: values below 3 are per cell (e.g. 2.27), others
    # are volts of the whole battery. Unset: NUT's defaults from the nominal voltage.
    battery_high: Volts | None = None
    battery_low: Volts | None = None
    battery_nominal: Volts | None = None  # only for UPSes that do not answer the `F` command
    # Seconds to wait for an answer; default 1.5 for serial, 3 for the network daemons.
    reply_timeout: Annotated[float, Meta(gt=0, le=30)] | None = None
    host: Annotated[str, Meta(min_length=1, max_length=253)] = "127.0.0.1"
    ups: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None  # NUT's UPS name
    username: Annotated[str, Meta(pattern=r"^\S{1,64}$")] | None = None
    password_file: str | None = None

    def __post_init__(self) -> None:
        allowed = _DRIVER_FIELDS[self.driver]
        defaults = UpsOptions.__struct_defaults__
        for name, default in zip(UpsOptions.__struct_fields__[1:], defaults[1:]):
            if name not in allowed and getattr(self, name) != default:
                users = [d for d, fields in _DRIVER_FIELDS.items() if name in fields]
                raise ValueError(f"`{name}` is not used by driver {self.driver} (only by {', '.join(users)})")
        if self.driver == "megatec":
            if not isinstance(self.port, str) or not self.port:
                raise ValueError("driver megatec needs `port`: the serial port, e.g. /dev/ttyUSB0 or COM3")
            high, low = self.battery_high, self.battery_low
            if high is not None and low is not None:
                if (high < PER_CELL_MAX) != (low < PER_CELL_MAX):
                    raise ValueError("give battery_high and battery_low both per cell (below 3) or both in volts")
                if high <= low:
                    raise ValueError("battery_high must be above battery_low")
        else:
            if self.port is not None and (not isinstance(self.port, int) or not 1 <= self.port <= 65535):
                raise ValueError(f"driver {self.driver}: `port` is a TCP port number from 1 to 65535")
            if self.driver == "nut" and not self.ups:
                raise ValueError("driver nut needs `ups`: the UPS name in upsd (as in upsc NAME@host)")
            if bool(self.username) != bool(self.password_file):
                raise ValueError("set both username and password_file, or neither")

    @property
    def tcp_port(self) -> int:
        if isinstance(self.port, int):
            return self.port
        return NUT_PORT if self.driver == "nut" else APCUPSD_PORT

    @property
    def timeout(self) -> float:
        return self.reply_timeout or (1.5 if self.driver == "megatec" else 3.0)


class ProtocolError(ValueError):
    """A reply that cannot be understood."""


class UpsError(Exception):
    """A failure with a reason code for the report (upsd's ERR, apcupsd's COMMLOST, ...)."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# What every driver produces before it becomes a wire entry


class Reading(Struct):
    on_batt: bool | None = None
    batt_low: bool | None = None
    failed: bool | None = None
    test: bool | None = None
    shutdown: bool | None = None
    bypass: bool | None = None
    off: bool = False  # UPS output switched off (NUT OFF)
    overload: bool = False
    replace: str = ""  # why the battery needs attention (replace, missing)
    load: float | None = None  # ratio of rated load
    in_v: float | None = None
    out_v: float | None = None
    in_hz: float | None = None
    batt_v: float | None = None
    temp: float | None = None
    charge: float | None = None
    vendor: str | None = None
    model: str | None = None


def assess(r: Reading) -> tuple[str, str, str]:
    """State, reason code and detail; the first matching row wins."""
    rules = (
        (r.failed, "error", "ups_failed", ""),
        (r.batt_low, "error", "battery_low", ""),
        (r.shutdown, "error", "ups_shutdown", ""),
        (r.off, "error", "ups_off", ""),
        (r.on_batt, "warn", "on_battery", "self-test in progress" if r.test else ""),
        (r.overload, "warn", "overload", ""),
        (bool(r.replace), "warn", "replace_battery", r.replace),
    )
    for hit, state, code, detail in rules:
        if hit:
            return state, code, detail
    return "ok", "", ""


def _bounded(value: float | None, low: float, high: float, digits: int = 3) -> float | None:
    """Drops a value the wire would refuse, so one odd reading cannot spoil the whole report."""
    if value is None or not low <= value <= high:
        return None
    return round(value, digits)


def _label(text: str | None) -> str | None:
    text = printable(text or "").strip()
    return text[:64] or None


def to_entry(r: Reading, via: str) -> wire.UpsEntry:
    state, code, detail = assess(r)
    return wire.UpsEntry(
        s=state, c=code, m=detail[:256],
        on_batt=r.on_batt, batt_low=r.batt_low, failed=r.failed, test=r.test,
        shutdown=r.shutdown, bypass=r.bypass,
        load=_bounded(r.load, 0, 10), in_v=_bounded(r.in_v, 0, 1000, 1), out_v=_bounded(r.out_v, 0, 1000, 1),
        in_hz=_bounded(r.in_hz, 0, 1000, 2), batt_v=_bounded(r.batt_v, 0, 1000, 2),
        temp=_bounded(r.temp, -100, 200, 1), charge=_bounded(r.charge, 0, 1),
        vendor=_label(r.vendor), model=_label(r.model), via=via,
    )


def printable(text: str | bytes, limit: int = 200) -> str:
    """Text safe for a report and a log line: non-printable characters become '?'."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return "".join(ch if ch.isprintable() and ord(ch) < 127 else "?" for ch in text[:limit])


# ---------------------------------------------------------------------------------------------
# Megatec / Q1 (pure)

_DASHES = re.compile(r"^[-.]*-[-.]*$")
_NUMERIC = re.compile(r"^\d+(\.\d*)?$|^\.\d+$")


def _q1_value(token: str) -> float | None:
    if _DASHES.match(token):  # the UPS has no such reading (`---.-`)
        return None
    if not _NUMERIC.match(token):
        raise ProtocolError(f"bad field {printable(token, 20)!r}")
    return float(token)


def _text(line: str | bytes) -> str:
    if isinstance(line, bytes):
        line = line.decode("latin-1")
    return line.rstrip("\r\n")


class Q1Status(Struct):
    in_v: float | None
    in_fault_v: float | None
    out_v: float | None
    load_pct: float | None
    in_hz: float | None
    batt_v: float | None  # as reported: whole battery or per cell
    temp: float | None
    on_batt: bool  # b7 utility fail
    batt_low: bool  # b6
    bypass: bool  # b5 bypass/boost/buck active
    failed: bool  # b4
    standby: bool  # b3 offline / line-interactive type
    test: bool  # b2
    shutdown: bool  # b1
    beeper: bool  # b0


def parse_q1(line: str | bytes) -> Q1Status:
    """`(MMM.M NNN.N PPP.P QQQ RR.R SS.S TT.T b7..b0` -> Q1Status; ProtocolError if garbled."""
    text = _text(line)
    if not text.startswith("("):
        raise ProtocolError("reply does not start with '('")
    fields = text[1:].split()
    if len(fields) != 8:
        raise ProtocolError(f"expected 8 fields, got {len(fields)}")
    bits = fields[7]
    if len(bits) != 8 or set(bits) - {"0", "1"}:
        raise ProtocolError("status is not 8 characters of 0/1")
    values = [_q1_value(token) for token in fields[:7]]
    flags = [ch == "1" for ch in bits]  # leftmost is b7
    return Q1Status(*values, *flags)


class Rating(Struct):
    voltage: float | None
    current: float | None
    battery_v: float | None  # nominal battery voltage
    frequency: float | None


def parse_f(line: str | bytes) -> Rating:
    """`#220.0 000 024.0 50.0` -> Rating."""
    text = _text(line)
    if not text.startswith("#"):
        raise ProtocolError("rating reply does not start with '#'")
    fields = text[1:].split()
    if len(fields) != 4:
        raise ProtocolError(f"expected 4 rating fields, got {len(fields)}")
    return Rating(*[_q1_value(token) for token in fields])


class Identity(Struct):
    vendor: str | None
    model: str | None
    firmware: str | None


def parse_i(line: str | bytes) -> Identity:
    """`#` + company (15) + ' ' + model (10) + ' ' + version (10) -> Identity (fixed columns)."""
    text = _text(line)
    if not text.startswith("#") or len(text) < 27:
        raise ProtocolError("identity reply is not '#' and fixed-width columns")

    def column(start: int, width: int) -> str | None:
        value = printable(text[start:start + width]).strip()
        return value if value.strip("-") else None  # dashes mean "not told"

    return Identity(column(1, 15), column(17, 10), column(28, 10))


def battery_packs(reported: float, nominal: float) -> float | None:
    """How many reported volts make the battery (NUT blazer's autodetection).

    A UPS may report the whole battery (27.3 for 24 V nominal: 1), a 12 V block (13.6: 2) or
    one cell (2.27: 12). None when the reading fits no multiple of the nominal voltage.
    """
    if reported <= 0 or nominal <= 0:
        return None
    for packs in _PACKS:
        if packs * reported > 1.2 * nominal:
            continue
        if packs * reported < 0.8 * nominal:
            return None
        return float(packs)
    return None


def charge_window(nominal: float, high: float | None = None, low: float | None = None) -> tuple[float, float]:
    """(low, high) battery volts for the charge estimate; per-cell settings scale by nominal / 2."""
    cells = nominal / 2.0

    def volts(value: float | None, default_ratio: float) -> float:
        if value is None:
            return default_ratio * nominal
        return value * cells if value < PER_CELL_MAX else value

    return volts(low, DEFAULT_LOW_OF_NOMINAL), volts(high, DEFAULT_HIGH_OF_NOMINAL)


def estimate_charge(volts: float | None, low: float, high: float) -> float | None:
    """Linear estimate between low (empty) and high (full), clamped to 0..1."""
    if volts is None or volts <= 0 or high <= low:
        return None
    return round(min(max((volts - low) / (high - low), 0.0), 1.0), 3)


# ---------------------------------------------------------------------------------------------
# NUT upsd (pure)

NUT_STALE_ERRORS = frozenset({"DATA-STALE", "DRIVER-NOT-CONNECTED"})


def _nut_split(line: str) -> list[str]:
    """Splits a upsd line into words; "quoted words" may hold spaces and \\-escapes."""
    words: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        if line[i] == '"':
            i += 1
            word = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    i += 1
                word.append(line[i])
                i += 1
            if i >= n:
                raise ProtocolError("unterminated quote")
            i += 1
            words.append("".join(word))
        else:
            start = i
            while i < n and line[i] != " ":
                i += 1
            words.append(line[start:i])
    return words


def nut_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def raise_for_nut_error(line: str) -> None:
    if line.startswith("ERR"):
        word = (line.split() + ["", ""])[1] or "UNKNOWN"
        code = "no_reply" if word in NUT_STALE_ERRORS else "daemon_error"
        raise UpsError(code, f"upsd: ERR {printable(word, 40)}")


def parse_nut_vars(lines: Iterable[str], ups: str) -> dict[str, str]:
    """The reply to `LIST VAR <ups>` -> {name: value}; UpsError for ERR, ProtocolError if garbled."""
    lines = [line.rstrip("\r\n") for line in lines]
    if not lines:
        raise ProtocolError("empty reply from upsd")
    for line in lines:
        raise_for_nut_error(line)
    if _nut_split(lines[0]) != ["BEGIN", "LIST", "VAR", ups]:
        raise ProtocolError(f"unexpected first line {printable(lines[0], 60)!r}")
    if _nut_split(lines[-1]) != ["END", "LIST", "VAR", ups] or len(lines) < 2:
        raise ProtocolError("reply does not end with END LIST VAR")
    variables: dict[str, str] = {}
    for line in lines[1:-1]:
        words = _nut_split(line)
        if len(words) != 4 or words[0] != "VAR" or words[1] != ups:
            raise ProtocolError(f"unexpected line {printable(line, 60)!r}")
        variables[words[2]] = words[3]
    return variables


def _maybe_number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.split()[0])
    except (ValueError, IndexError):
        return None


def nut_reading(variables: dict[str, str]) -> Reading:
    status = variables.get("ups.status")
    if status is None:
        raise ProtocolError("upsd sent no ups.status")
    tokens = set(status.upper().split())
    if "WAIT" in tokens:  # the driver has not reached the UPS yet
        raise UpsError("no_reply", "upsd: ups.status WAIT (the driver has no data from the UPS yet)")
    if not tokens & {"OL", "OB", "OFF"}:
        raise ProtocolError(f"ups.status {printable(status, 40)!r} says neither OL, OB nor OFF")
    test_result = variables.get("ups.test.result", "").lower()
    charge = _maybe_number(variables.get("battery.charge"))
    load = _maybe_number(variables.get("ups.load"))
    replace = "replace battery (RB)" if "RB" in tokens else ""
    return Reading(
        on_batt="OB" in tokens if tokens & {"OB", "OL"} else None,  # OFF alone: neither
        batt_low="LB" in tokens,
        failed=("fail" in test_result or "error" in test_result) if test_result else None,
        test="CAL" in tokens,
        shutdown="FSD" in tokens,
        bypass=bool(tokens & {"BYPASS", "BOOST", "TRIM"}),
        off="OFF" in tokens,
        overload="OVER" in tokens,
        replace=replace,
        load=load / 100.0 if load is not None else None,
        in_v=_maybe_number(variables.get("input.voltage")),
        out_v=_maybe_number(variables.get("output.voltage")),
        in_hz=_maybe_number(variables.get("input.frequency")),
        batt_v=_maybe_number(variables.get("battery.voltage")),
        temp=_maybe_number(variables.get("ups.temperature")),
        charge=charge / 100.0 if charge is not None else None,
        vendor=variables.get("device.mfr") or variables.get("ups.mfr"),
        model=variables.get("device.model") or variables.get("ups.model"),
    )


# ---------------------------------------------------------------------------------------------
# apcupsd NIS (pure)


def parse_apcupsd_status(text: str) -> dict[str, str]:
    """`KEY      : value` lines -> {KEY: value}; ProtocolError when there is no STATUS."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and " " not in key:
            fields[key] = value.strip()
    if "STATUS" not in fields:
        raise ProtocolError("apcupsd sent no STATUS line")
    return fields


def apcupsd_reading(fields: dict[str, str]) -> Reading:
    status = fields["STATUS"].upper()
    words = set(status.split())
    if "COMMLOST" in words:
        raise UpsError("no_reply", "apcupsd: COMMLOST (it cannot reach the UPS)")
    shutting_down = "SHUTTING DOWN" in status
    if not words & {"ONLINE", "ONBATT"} and not shutting_down:
        raise ProtocolError(f"STATUS {printable(status, 40)!r} says neither ONLINE nor ONBATT")
    charge = _maybe_number(fields.get("BCHARGE"))
    load = _maybe_number(fields.get("LOADPCT"))
    selftest = fields.get("SELFTEST", "").upper()
    replace = ("replace battery (REPLACEBATT)" if "REPLACEBATT" in words
               else "no battery (NOBATT)" if "NOBATT" in words else "")
    return Reading(
        on_batt="ONBATT" in words if words & {"ONBATT", "ONLINE"} else None,
        batt_low="LOWBATT" in words,
        # apcupsd's last self-test: BT = battery capacity too low, NG = overload
        failed=selftest in {"BT", "NG"} if selftest else None,
        test="CAL" in words,
        shutdown=shutting_down,
        bypass=bool(words & {"TRIM", "BOOST"}),
        overload="OVERLOAD" in words,
        replace=replace,
        load=load / 100.0 if load is not None else None,
        in_v=_maybe_number(fields.get("LINEV")),
        out_v=_maybe_number(fields.get("OUTPUTV")),
        in_hz=_maybe_number(fields.get("LINEFREQ")),
        batt_v=_maybe_number(fields.get("BATTV")),
        temp=_maybe_number(fields.get("ITEMP")),
        charge=charge / 100.0 if charge is not None else None,
        vendor=fields.get("VENDOR") or fields.get("MANUFACTURER"),
        model=fields.get("MODEL") or fields.get("APCMODEL"),
    )


# ---------------------------------------------------------------------------------------------
# Sockets


class _Connection:
    """A TCP connection where every read and write shares one deadline."""

    MAX_LINE = 4096

    def __init__(self, host: str, port: int, timeout: float):
        self.deadline = time.monotonic() + timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        return left

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self._left())
        self.sock.sendall(data)

    def _fill(self) -> None:
        self.sock.settimeout(self._left())
        chunk = self.sock.recv(4096)
        if not chunk:
            raise ProtocolError("the server closed the connection mid-reply")
        self.buffer += chunk

    def line(self) -> str:
        while b"\n" not in self.buffer:
            if len(self.buffer) > self.MAX_LINE:
                raise ProtocolError("line too long")
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def close(self) -> None:
        self.sock.close()


def nut_list_vars(host: str, port: int, ups: str, timeout: float,
                  username: str | None = None, password: str | None = None) -> dict[str, str]:
    conn = _Connection(host, port, timeout)
    try:
        if username:
            for command in (f"USERNAME {nut_quote(username)}", f"PASSWORD {nut_quote(password or '')}"):
                conn.send(command.encode() + b"\n")
                answer = conn.line()
                raise_for_nut_error(answer)
                if not answer.startswith("OK"):
                    raise ProtocolError(f"unexpected answer {printable(answer, 60)!r}")
        conn.send(f"LIST VAR {ups}\n".encode())
        lines = [conn.line()]
        end = f"END LIST VAR {ups}"
        while not lines[0].startswith("ERR") and lines[-1] != end:
            if len(lines) > 2000:
                raise ProtocolError("too many lines")
            lines.append(conn.line())
        try:
            conn.send(b"LOGOUT\n")  # polite; upsd logs a dropped client otherwise
        except OSError:
            pass
        return parse_nut_vars(lines, ups)
    finally:
        conn.close()


def apcupsd_status(host: str, port: int, timeout: float) -> dict[str, str]:
    conn = _Connection(host, port, timeout)
    try:
        conn.send(b"\x00\x06status")
        records: list[bytes] = []
        total = 0
        while True:
            size = int.from_bytes(conn.exactly(2), "big")
            if size == 0:  # end of the status
                break
            if size > 0x7FFF or total + size > 64 * 1024:
                raise ProtocolError(f"record of {size} bytes is too large")
            records.append(conn.exactly(size))
            total += size
        text = "\n".join(r.decode("utf-8", "replace").rstrip("\n") for r in records)
        return parse_apcupsd_status(text)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# The probe


class UpsProbe(Probe):
    type_name = "ups"
    entry_type = wire.UpsEntry
    Options = UpsOptions
    codes = (
        "on_battery", "battery_low", "ups_failed", "ups_shutdown", "ups_off", "overload", "replace_battery",
        "no_reply", "garbled_reply", "port_unavailable", "daemon_unreachable", "daemon_error",
    )

    def __init__(self, name: str, options: UpsOptions, context):
        super().__init__(name, options, context)
        self._lock = threading.Lock()  # run() and close() come from different threads
        self._port: serial.SerialBase | None = None
        self._closed = False
        # Read once per serial connection: a reconnect may mean another UPS.
        self._rating: Rating | None = None
        self._identity: Identity | None = None
        self._packs: float | None = None

    def _error(self, code: str, detail: str) -> wire.UpsEntry:
        return wire.UpsEntry(s="error", c=code, m=printable(detail, 256), via=self.options.driver)

    def failed(self, code: str, detail: str = "") -> wire.UpsEntry:
        return self._error(code, detail)

    def change_key(self, entry: wire.UpsEntry) -> tuple:
        # A mains failure or a low battery must go out at once, even if the state word is the same.
        return (entry.s, entry.c, entry.on_batt, entry.batt_low, entry.failed, entry.shutdown)

    def run(self) -> wire.UpsEntry:
        opts: UpsOptions = self.options
        if opts.driver == "megatec":
            with self._lock:
                return self._run_megatec()
        try:
            if opts.driver == "nut":
                password = self._password() if opts.username else None
                reading = nut_reading(nut_list_vars(opts.host, opts.tcp_port, opts.ups or "", opts.timeout,
                                                    opts.username, password))
            else:
                reading = apcupsd_reading(apcupsd_status(opts.host, opts.tcp_port, opts.timeout))
        except UpsError as exc:
            return self._error(exc.code, exc.detail)
        except ProtocolError as exc:
            return self._error("garbled_reply", f"{opts.driver}: {exc}")
        except OSError as exc:  # refused, unreachable, timed out, reset
            reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
            return self._error("daemon_unreachable", f"{opts.host}:{opts.tcp_port}: {reason}")
        return to_entry(reading, opts.driver)

    def _password(self) -> str:
        path = self.options.password_file
        try:
            with open(path, encoding="utf-8") as fh:
                password = fh.read().strip("\r\n")
        except OSError as exc:
            raise UpsError("probe_failed", f"cannot read {path}: {exc.strerror}") from None
        if not password:
            raise UpsError("probe_failed", f"{path} is empty")
        return password

    # -- Megatec -------------------------------------------------------------------------------

    def _open(self) -> serial.SerialBase:
        import serial

        if self._port is None:
            opts: UpsOptions = self.options
            self._port = serial.serial_for_url(
                opts.port, baudrate=opts.baud, bytesize=serial.EIGHTBITS, parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE, timeout=opts.timeout, write_timeout=opts.timeout,
            )
            self._rating = self._identity = None
            self._packs = None
            log.debug("ups %s: opened %s", self.name, opts.port)
        return self._port

    def _drop_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            import serial  # imported already: the port was opened

            try:
                port.close()
            except (OSError, serial.SerialException):
                pass

    def _command(self, port: serial.SerialBase, command: bytes) -> bytes:
        port.reset_input_buffer()  # a late answer to an earlier command must not be taken for this one
        port.write(command)
        return port.read_until(b"\r", 128)

    def _run_megatec(self) -> wire.UpsEntry:
        import serial

        opts: UpsOptions = self.options
        if self._closed:
            return self._error("probe_failed", "probe closed")
        try:
            port = self._open()
        except (serial.SerialException, OSError, ValueError) as exc:
            return self._error("port_unavailable", f"{opts.port}: {getattr(exc, 'strerror', None) or exc}")
        try:
            raw = self._command(port, b"Q1\r")
            if not raw:
                # Reopen next time, and read F and I again: the UPS may have been swapped meanwhile.
                self._drop_port()
                return self._error("no_reply", f"no answer to Q1 within {opts.timeout:g} s on {opts.port}")
            if not raw.endswith(b"\r"):
                return self._error("garbled_reply", f"incomplete: {printable(raw, 80)}")
            try:
                status = parse_q1(raw)
            except ProtocolError as exc:
                return self._error("garbled_reply", f"{exc}: {printable(raw.rstrip(), 80)}")
            if self._rating is None and opts.battery_nominal is None:
                self._rating = self._ask(port, b"F\r", parse_f) or Rating(None, None, None, None)
            if self._identity is None:
                self._identity = self._ask(port, b"I\r", parse_i) or Identity(None, None, None)
        except (serial.SerialException, OSError) as exc:  # adapter unplugged, port closed under us
            self._drop_port()
            return self._error("port_unavailable", f"{opts.port}: {exc}")
        return to_entry(self._megatec_reading(status), "megatec")

    def _ask(self, port: serial.SerialBase, command: bytes, parse):
        """F and I are optional: many UPSes echo or ignore them."""
        raw = self._command(port, command)
        try:
            return parse(raw) if raw.endswith(b"\r") else None
        except ProtocolError as exc:
            log.debug("ups %s: %r not understood (%s): %r", self.name, command, exc, raw)
            return None

    def _megatec_reading(self, q1: Q1Status) -> Reading:
        opts: UpsOptions = self.options
        nominal = opts.battery_nominal or (self._rating.battery_v if self._rating else None)
        batt_v, charge = q1.batt_v, None
        if nominal and q1.batt_v:
            if self._packs is None:  # detected once, as NUT does, so the estimate cannot jump
                self._packs = battery_packs(q1.batt_v, nominal)
            if self._packs is not None:
                batt_v = q1.batt_v * self._packs
                low, high = charge_window(nominal, opts.battery_high, opts.battery_low)
                charge = estimate_charge(batt_v, low, high)
        identity = self._identity or Identity(None, None, None)
        return Reading(
            on_batt=q1.on_batt, batt_low=q1.batt_low, failed=q1.failed, test=q1.test,
            shutdown=q1.shutdown, bypass=q1.bypass,
            load=q1.load_pct / 100.0 if q1.load_pct is not None else None,
            in_v=q1.in_v, out_v=q1.out_v, in_hz=q1.in_hz, batt_v=batt_v, temp=q1.temp, charge=charge,
            vendor=identity.vendor, model=identity.model,
        )

    def close(self) -> None:
        self._closed = True
        port = self._port
        if port is not None and hasattr(port, "cancel_read"):
            import serial  # imported already: the port was opened

            try:
                port.cancel_read()  # wakes a run() blocked in read so the lock comes free quickly
            except (OSError, serial.SerialException, AttributeError):
                pass
        with self._lock:
            self._drop_port()
