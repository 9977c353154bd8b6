"""The UPS probe: Megatec over a real pty, a real NUT upsd with dummy-ups, apcupsd NIS on loopback."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path
from types import MappingProxyType

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import wire
from agent.config import ConfigError, convert, load
from agent.probes.base import ProbeContext
from agent.probes.ups import (
    ProtocolError,
    UpsError,
    UpsOptions,
    UpsProbe,
    apcupsd_reading,
    battery_packs,
    charge_window,
    estimate_charge,
    nut_reading,
    parse_apcupsd_status,
    parse_f,
    parse_i,
    parse_nut_vars,
    parse_q1,
    to_entry,
)
from agent.runner import InlineExecutor, Runner, Slot
from collector.devbroker import free_port
from collector.upsemu import MegatecPty, MegatecUps
from tests.conftest import wait_for


def make_probe(**options) -> UpsProbe:
    return UpsProbe("ups", convert(options, UpsOptions, "test.yaml", ".probes.ups"), ProbeContext())


def on_wire(entry: wire.UpsEntry) -> wire.UpsEntry:
    """Every entry must survive the collector's strict decoding inside a report."""
    report = wire.Report(v=1, kab="sintang", kec="dedai", kit="kit-1", ts=1.0, boot="00112233aabbccdd",
                         seq=1, hb=60, p={"ups": entry})
    return wire.decode_report(wire.encode(report)).p["ups"]


# ---------------------------------------------------------------------------------------------
# Megatec parsing

def test_parse_q1_example_from_the_protocol():
    q1 = parse_q1(b"(226.0 195.0 226.0 014 49.0 27.5 30.0 00001000\r")
    assert (q1.in_v, q1.in_fault_v, q1.out_v, q1.load_pct, q1.in_hz, q1.batt_v, q1.temp) == (
        226.0, 195.0, 226.0, 14.0, 49.0, 27.5, 30.0)
    assert q1.standby and not (q1.on_batt or q1.batt_low or q1.bypass or q1.failed or q1.test or q1.shutdown)


def test_parse_q1_status_bits_leftmost_is_b7():
    q1 = parse_q1("(000.0 000.0 220.0 018 --.- 2.05 31.0 11110110")
    assert (q1.on_batt, q1.batt_low, q1.bypass, q1.failed, q1.standby, q1.test, q1.shutdown, q1.beeper) == (
        True, True, True, True, False, True, True, False)


def test_parse_q1_tolerates_dashes():
    q1 = parse_q1("(---.- ---.- 226.0 --- --.- 27.5 ---.- 00001000\r")
    assert (q1.in_v, q1.in_fault_v, q1.load_pct, q1.in_hz, q1.temp) == (None, None, None, None, None)
    assert q1.out_v == 226.0


@pytest.mark.parametrize("line, why", [
    ("226.0 195.0 226.0 014 49.0 27.5 30.0 00001000", "start"),
    ("(226.0 195.0 226.0 014 49.0 27.5 30.0 0000100", "8 characters"),
    ("(226.0 195.0 226.0 014 49.0 27.5 30.0 000010000", "8 characters"),
    ("(226.0 195.0 226.0 014 49.0 27.5 30.0 00002000", "8 characters"),
    ("(226.0 195.0 226.0 014 49.0 27.5 00001000", "8 fields"),
    ("(226.0 195.0 226.0 014 49.0 27.5 30.0 00001000 7", "8 fields"),
    ("(226.0 1#5.0 226.0 014 49.0 27.5 30.0 00001000", "bad field"),
    ("(226.0 195.0 226.0 014 49.0 -27.5 30.0 00001000", "bad field"),
    ("", "start"),
])
def test_parse_q1_refuses_garbled(line, why):
    with pytest.raises(ProtocolError, match=why):
        parse_q1(line)


def test_parse_f_and_i():
    assert parse_f(b"#220.0 000 024.0 50.0\r") == parse_f("#220.0 000 024.0 50.0")
    rating = parse_f("#220.0 000 024.0 50.0")
    assert (rating.voltage, rating.current, rating.battery_v, rating.frequency) == (220.0, 0.0, 24.0, 50.0)
    assert parse_f("#220.0 --- 024.0 --.-").current is None
    ident = parse_i(b"#EMULATED UPS    MEGA-1000  EMU-0.1   \r")
    assert (ident.vendor, ident.model, ident.firmware) == ("EMULATED UPS", "MEGA-1000", "EMU-0.1")
    # a unit that tells only its firmware (from NUT's blazer sources)
    ident = parse_i("#-------------   ------     VT12046Q  ")
    assert (ident.vendor, ident.model, ident.firmware) == (None, None, "VT12046Q")
    for bad in ("F", "(226.0 195.0", "#220.0 000 024.0", "#220.0 000 0x4.0 50.0"):  # echo, wrong reply, ...
        with pytest.raises(ProtocolError):
            parse_f(bad)
    for bad in ("I", "#short", "(226.0 195.0 226.0 014 49.0 27.5 30.0 00001000"):
        with pytest.raises(ProtocolError):
            parse_i(bad)


def test_battery_packs_as_nut_detects_them():
    assert battery_packs(27.3, 24.0) == 1  # whole battery
    assert battery_packs(13.6, 24.0) == 2  # one 12 V block
    assert battery_packs(2.27, 24.0) == 12  # one cell
    assert battery_packs(2.27, 12.0) == 6
    assert battery_packs(19.0, 24.0) is None  # below 0.8 of nominal for every multiple


def test_charge_window_defaults_and_per_cell_settings():
    assert charge_window(24.0) == pytest.approx((20.8, 26.0))  # NUT's 104/120 and 130/120
    assert charge_window(24.0, high=2.25, low=1.75) == pytest.approx((21.0, 27.0))  # per cell x 12
    assert charge_window(24.0, high=27.0, low=21.0) == pytest.approx((21.0, 27.0))
    assert estimate_charge(20.0, 20.8, 26.0) == 0.0
    assert estimate_charge(30.0, 20.8, 26.0) == 1.0
    assert estimate_charge(23.4, 20.8, 26.0) == pytest.approx(0.5)
    assert estimate_charge(None, 20.8, 26.0) is None


@given(st.floats(0.1, 60), st.floats(0.1, 60), st.sampled_from([12.0, 24.0, 36.0, 48.0]))
def test_charge_estimate_is_bounded_and_monotonic(v1, v2, nominal):
    low, high = charge_window(nominal)
    c1, c2 = estimate_charge(v1, low, high), estimate_charge(v2, low, high)
    assert 0.0 <= c1 <= 1.0 and 0.0 <= c2 <= 1.0
    if v1 <= v2:
        assert c1 <= c2


# ---------------------------------------------------------------------------------------------
# Options

@pytest.mark.parametrize("options, message", [
    ({}, "needs `port`"),
    ({"port": 3493}, "needs `port`"),
    ({"port": "/dev/ttyUSB0", "ups": "kit"}, "`ups` is not used by driver megatec"),
    ({"port": "/dev/ttyUSB0", "battery_high": 2.0, "battery_low": 2.1}, "above"),
    ({"port": "/dev/ttyUSB0", "battery_high": 27.0, "battery_low": 1.75}, "both per cell"),
    ({"driver": "nut"}, "needs `ups`"),
    ({"driver": "nut", "ups": "kit", "port": "3493"}, "TCP port"),
    ({"driver": "nut", "ups": "kit", "username": "mon"}, "password_file"),
    ({"driver": "apcupsd", "baud": 9600}, "`baud` is not used by driver apcupsd"),
    ({"driver": "apcupsd", "colour": "red"}, "unknown key"),
])
def test_options_refuse_mistakes_with_a_reason(options, message):
    with pytest.raises(ConfigError, match=message):
        convert(options, UpsOptions, "agent.yaml", ".probes.ups")


def test_options_from_an_agent_config_file(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(
        "kit: {kabupaten: sintang, kecamatan: dedai, id: kit-1}\n"
        "broker: {url: 'mqtt://127.0.0.1:1883'}\n"
        "probes:\n"
        "  ups: {port: /dev/ttyUSB0, battery_low: 1.75, battery_high: 2.25, interval: 10}\n"
        "  ups-nut: {type: ups, driver: nut, ups: kit, host: 192.168.1.5}\n")
    specs = {spec.name: spec for spec in load(path, registry={"ups": UpsProbe}).probes}
    assert (specs["ups"].type, specs["ups"].options.port, specs["ups"].options.battery_low) == ("ups", "/dev/ttyUSB0", 1.75)
    assert (specs["ups-nut"].options.host, specs["ups-nut"].options.tcp_port) == ("192.168.1.5", 3493)
    path.write_text(path.read_text().replace("ups: kit, ", ""))
    with pytest.raises(ConfigError, match="probes.ups-nut: driver nut needs `ups`"):
        load(path, registry={"ups": UpsProbe})


def test_options_defaults_per_driver():
    nut = convert({"driver": "nut", "ups": "kit"}, UpsOptions, "agent.yaml")
    apc = convert({"driver": "apcupsd"}, UpsOptions, "agent.yaml")
    meg = convert({"port": "COM3"}, UpsOptions, "agent.yaml")
    assert (nut.host, nut.tcp_port, nut.timeout) == ("127.0.0.1", 3493, 3.0)
    assert (apc.tcp_port, meg.baud, meg.timeout) == (3551, 2400, 1.5)


# ---------------------------------------------------------------------------------------------
# Megatec through the real serial code path, against the emulator on a pty

@pytest.fixture
def megatec():
    """(emulated UPS, pty path); the probe opens the path with pyserial."""
    ups = MegatecUps()
    with MegatecPty(ups) as pty:
        yield ups, pty.path


@pytest.fixture
def probe_factory():
    made: list[UpsProbe] = []

    def make(**options) -> UpsProbe:
        p = make_probe(**options)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_megatec_fields_follow_each_mode(megatec, probe_factory):
    ups, path = megatec
    p = probe_factory(port=path, reply_timeout=0.5)

    entry = on_wire(p.run())
    assert (entry.s, entry.c, entry.on_batt, entry.batt_low, entry.failed) == ("ok", "", False, False, False)
    assert (entry.in_v, entry.out_v, entry.in_hz, entry.load, entry.temp) == (226.0, 226.0, 50.0, 0.14, 30.0)
    assert (entry.vendor, entry.model, entry.via) == ("EMULATED UPS", "MEGA-1000", "megatec")
    assert entry.batt_v == pytest.approx(27.4) and entry.charge == 1.0

    ups.set_mode("mains_failure")
    entry = on_wire(p.run())
    assert (entry.s, entry.c, entry.on_batt, entry.batt_low) == ("warn", "on_battery", True, False)
    assert entry.in_v == 0.0 and entry.out_v == 220.0 and 0.5 < entry.charge < 1.0

    ups.set_mode("battery_low")
    entry = on_wire(p.run())
    assert (entry.s, entry.c, entry.on_batt, entry.batt_low) == ("error", "battery_low", True, True)
    assert 0.0 <= entry.charge < 0.3

    ups.set_mode("garbled")
    entry = on_wire(p.run())
    assert (entry.s, entry.c, entry.on_batt) == ("error", "garbled_reply", None)
    assert "(226.0 1?5.0" in entry.m and entry.m.isprintable() and len(entry.m) <= 256

    ups.set_mode("mains")
    ups.set(failed=True)
    entry = on_wire(p.run())
    assert (entry.s, entry.c, entry.failed) == ("error", "ups_failed", True)

    ups.set(failed=False, shutdown=True, test=True, bypass=True)
    entry = on_wire(p.run())
    assert (entry.s, entry.c, entry.shutdown, entry.test, entry.bypass) == ("error", "ups_shutdown", True, True, True)
    assert ups.count("F") == 1 and ups.count("I") == 1, "F and I are read once per connection"


def test_megatec_dash_fields_are_tolerated(megatec, probe_factory):
    ups, path = megatec
    ups.set(in_v=None, in_fault_v=None, in_hz=None, temp=None, load=None)
    assert b"---.- ---.- 226.0 --- --.- 27.4 --.-" in ups.q1_line()
    entry = on_wire(probe_factory(port=path, reply_timeout=0.5).run())
    assert (entry.s, entry.in_v, entry.in_hz, entry.temp, entry.load, entry.out_v) == ("ok", None, None, None, None, 226.0)


def test_megatec_silence_is_no_reply_within_the_timeout_then_recovers(megatec, probe_factory):
    ups, path = megatec
    p = probe_factory(port=path, reply_timeout=0.4)
    assert p.run().s == "ok"
    assert (ups.count("F"), ups.count("I")) == (1, 1)

    ups.set_mode("silent")
    ups.set(model="MEGA-2000")  # another unit plugged in while it was quiet
    start = time.monotonic()
    entry = on_wire(p.run())
    elapsed = time.monotonic() - start
    assert (entry.s, entry.c) == ("error", "no_reply") and "Q1" in entry.m
    assert elapsed < 0.4 + 0.5, f"no_reply took {elapsed:.2f} s"

    ups.set_mode("mains")
    entry = wait_for(lambda: (e := p.run()).s == "ok" and e, timeout=5, what="recovery after silence")
    assert entry.model == "MEGA-2000", "identity is read again after a reconnect"
    assert (ups.count("F"), ups.count("I")) == (2, 2)
    p.run()
    assert (ups.count("F"), ups.count("I")) == (2, 2)


def test_megatec_charge_follows_battery_voltage(megatec, probe_factory):
    ups, path = megatec
    ups.set(batt_v=19.0)
    first = probe_factory(port=path, reply_timeout=0.5).run()
    # 19 V fits no multiple of a 24 V battery (NUT's 0.8..1.2 rule): unknown, not a guess
    assert (first.s, first.charge) == ("ok", None)
    ups.set_mode("mains")
    p = probe_factory(port=path, reply_timeout=0.5)
    assert p.run().charge == 1.0  # the multiple is detected on a charged battery and kept
    charges = []
    for tenth in range(190, 291, 5):  # 19.0 .. 29.0 V on a 24 V battery
        ups.set(batt_v=tenth / 10)
        entry = p.run()
        assert entry.s == "ok" and entry.charge is not None
        charges.append(entry.charge)
    assert all(0.0 <= c <= 1.0 for c in charges)
    assert charges == sorted(charges) and charges[0] == 0.0 and charges[-1] == 1.0


def test_megatec_per_cell_voltage_and_configured_window(probe_factory):
    ups = MegatecUps(per_cell=True)
    with MegatecPty(ups) as pty:
        assert b" 2.28 " in ups.q1_line()
        entry = probe_factory(port=pty.path, reply_timeout=0.5).run()
        assert entry.batt_v == pytest.approx(27.36) and entry.charge == 1.0
        ups.set(batt_v=24.0)  # 2.00 per cell
        per_cell = probe_factory(port=pty.path, reply_timeout=0.5, battery_low=1.75, battery_high=2.25)
        assert per_cell.run().charge == pytest.approx(0.5)


def test_megatec_without_rating_needs_a_nominal_voltage(probe_factory):
    ups = MegatecUps(answers_f=False, answers_i=False)
    with MegatecPty(ups) as pty:
        entry = probe_factory(port=pty.path, reply_timeout=0.3).run()
        assert (entry.s, entry.charge, entry.vendor, entry.batt_v) == ("ok", None, None, 27.4)
        entry = probe_factory(port=pty.path, reply_timeout=0.3, battery_nominal=24.0).run()
        assert entry.charge == 1.0


def test_megatec_slow_answer_within_the_timeout_is_taken(megatec, probe_factory):
    ups, path = megatec
    ups.set(latency=0.2)
    assert probe_factory(port=path, reply_timeout=1.0).run().s == "ok"


def test_megatec_missing_port_is_an_error_entry(tmp_path, probe_factory):
    entry = on_wire(probe_factory(port=str(tmp_path / "ttyUSB9")).run())
    assert (entry.s, entry.c) == ("error", "port_unavailable") and "ttyUSB9" in entry.m


def test_megatec_close_interrupts_a_waiting_run(megatec):
    ups, path = megatec
    p = make_probe(port=path, reply_timeout=5.0)
    assert p.run().s == "ok"
    ups.set_mode("silent")
    results = []
    worker = threading.Thread(target=lambda: results.append(p.run()))
    worker.start()
    wait_for(lambda: ups.count("Q1") >= 2, timeout=5, what="the probe to ask")
    start = time.monotonic()
    p.close()
    worker.join(5)
    assert time.monotonic() - start < 2.0 and results and results[0].s == "error"
    assert p.run().s == "error", "a closed probe does not reopen the port"


def test_megatec_mains_failure_reports_at_once(megatec):
    """Through the runner: the change key makes a mains failure go out before the heartbeat."""
    ups, path = megatec
    p = make_probe(port=path, reply_timeout=0.5)
    reports: list[wire.Report] = []

    class Clock:
        mono = 1000.0

        def time(self):
            return 1_800_000_000.0 + self.mono

        def monotonic(self):
            return self.mono

    clock = Clock()
    runner = Runner(wire.KitId("sintang", "dedai", "kit-1"), [Slot(p, 5.0, 5.0)], 3600, reports.append,
                    clock=clock, executor=InlineExecutor(), boot="00112233aabbccdd")
    try:
        runner.step()
        assert len(reports) == 1 and reports[0].p["ups"].s == "ok"
        clock.mono += 5
        runner.step()
        assert len(reports) == 1, "nothing changed, no report before the heartbeat"
        ups.set_mode("mains_failure")
        clock.mono += 5
        runner.step()
        assert len(reports) == 2 and reports[1].p["ups"].on_batt is True
        ups.set_mode("battery_low")
        clock.mono += 5
        runner.step()
        assert len(reports) == 3 and reports[2].p["ups"].c == "battery_low"
    finally:
        runner.close()


# ---------------------------------------------------------------------------------------------
# NUT: parsing

def test_parse_nut_vars():
    lines = [
        "BEGIN LIST VAR kit",
        'VAR kit ups.status "OB LB"',
        'VAR kit device.model "Smart \\"UPS\\" 1000"',
        'VAR kit battery.charge "35"',
        "END LIST VAR kit",
    ]
    assert parse_nut_vars(lines, "kit") == {"ups.status": "OB LB", "device.model": 'Smart "UPS" 1000',
                                            "battery.charge": "35"}


@pytest.mark.parametrize("line, code, word", [
    ("ERR UNKNOWN-UPS", "daemon_error", "UNKNOWN-UPS"),
    ("ERR ACCESS-DENIED", "daemon_error", "ACCESS-DENIED"),
    ("ERR DATA-STALE", "no_reply", "DATA-STALE"),
    ("ERR DRIVER-NOT-CONNECTED", "no_reply", "DRIVER-NOT-CONNECTED"),
])
def test_parse_nut_vars_err_lines(line, code, word):
    with pytest.raises(UpsError) as caught:
        parse_nut_vars([line], "kit")
    assert caught.value.code == code and word in caught.value.detail


@pytest.mark.parametrize("lines", [
    [],
    ["BEGIN LIST VAR kit", 'VAR kit ups.status "OL"'],
    ["BEGIN LIST VAR other", "END LIST VAR other"],
    ["BEGIN LIST VAR kit", 'VAR kit ups.status "OL', "END LIST VAR kit"],
    ["BEGIN LIST VAR kit", "VAR kit ups.status", "END LIST VAR kit"],
    ["hello"],
])
def test_parse_nut_vars_refuses_garbage(lines):
    with pytest.raises(ProtocolError):
        parse_nut_vars(lines, "kit")


@pytest.mark.parametrize("status, expect", [
    ("OL", ("ok", "", False, False)),
    ("OL CHRG", ("ok", "", False, False)),
    ("OB DISCHRG", ("warn", "on_battery", True, False)),
    ("OB LB", ("error", "battery_low", True, True)),
    ("OL RB", ("warn", "replace_battery", False, False)),
    ("OB LB FSD", ("error", "battery_low", True, True)),
    ("OL FSD", ("error", "ups_shutdown", False, False)),
    ("OFF", ("error", "ups_off", None, False)),
    ("OL OVER", ("warn", "overload", False, False)),
])
def test_nut_status_tokens(status, expect):
    entry = to_entry(nut_reading({"ups.status": status}), "nut")
    assert (entry.s, entry.c, entry.on_batt, entry.batt_low) == expect


def test_nut_status_without_power_source():
    with pytest.raises(UpsError) as caught:
        nut_reading({"ups.status": "WAIT"})
    assert caught.value.code == "no_reply"
    with pytest.raises(ProtocolError):
        nut_reading({"ups.status": "ALARM"})


def test_nut_reading_maps_values():
    reading = nut_reading({"ups.status": "OL BYPASS CAL", "battery.charge": "87", "ups.load": "23",
                           "input.voltage": "229.5", "output.voltage": "230.1", "input.frequency": "50.1",
                           "battery.voltage": "27.10", "ups.temperature": "33.5", "ups.mfr": "Old",
                           "device.mfr": "ACME", "device.model": "Line 650", "ups.test.result": "Done and error"})
    assert (reading.charge, reading.load, reading.in_v, reading.out_v, reading.in_hz) == (0.87, 0.23, 229.5, 230.1, 50.1)
    assert (reading.batt_v, reading.temp, reading.vendor, reading.model) == (27.1, 33.5, "ACME", "Line 650")
    assert (reading.bypass, reading.test, reading.failed) == (True, True, True)
    with pytest.raises(ProtocolError):
        nut_reading({"battery.charge": "87"})


# ---------------------------------------------------------------------------------------------
# NUT: a real upsd with the dummy-ups driver

def _find(name: str) -> str:
    # The real binaries first: Debian's /usr/sbin/upsd is a wrapper that exits unless
    # /etc/nut/nut.conf enables the system's own daemon.
    for path in (f"/lib/nut/{name}", f"/usr/lib/nut/{name}", f"/usr/libexec/nut/{name}", shutil.which(name)):
        if path and os.access(path, os.X_OK):
            return path
    raise AssertionError(f"{name} is not installed; run: sudo apt-get install -y nut-server")


class NutServer:
    """dummy-ups reading a .dev file the test writes, and upsd on a free loopback port."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dev = self.dir / "kit.dev"
        self.user = getpass.getuser()
        self.procs: dict[str, subprocess.Popen] = {}
        self._mtime = time.time()
        self.env = {**os.environ, "NUT_CONFPATH": str(self.dir), "NUT_STATEPATH": str(self.dir),
                    "NUT_ALTPIDPATH": str(self.dir)}

    def write_dev(self, **variables: str) -> None:
        text = "".join(f"{name}: {value}\n" for name, value in variables.items())
        self.dev.write_text(text)
        # dummy-ups re-reads a .dev file when its mtime (whole seconds) changes; step it explicitly.
        self._mtime += 2
        os.utime(self.dev, (self._mtime, self._mtime))

    def start(self) -> "NutServer":
        (self.dir / "ups.conf").write_text(
            f"[kit]\n  driver = dummy-ups\n  port = {self.dev}\n  mode = dummy-once\n  pollinterval = 1\n"
            "  desc = \"ektp test\"\n")
        (self.dir / "upsd.conf").write_text(f"LISTEN 127.0.0.1 {self.port}\n")
        users = self.dir / "upsd.users"
        users.write_text("[monitor]\n  password = rahasia\n  upsmon secondary\n")
        users.chmod(0o600)
        self.dir.chmod(0o700)
        self._spawn("driver", [_find("dummy-ups"), "-a", "kit", "-F", "-u", self.user])
        wait_for(lambda: (self.dir / "dummy-ups-kit").exists() or self._dead("driver"), timeout=15,
                 what="the dummy-ups socket")
        self._dead("driver")
        self._spawn("upsd", [_find("upsd"), "-F", "-u", self.user])
        wait_for(lambda: self._listening() or self._dead("upsd"), timeout=15, what="upsd to listen")
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")
        try:
            self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env, cwd=self.dir)
        finally:
            log.close()

    def _dead(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}: {self.log(name)}")
        return False

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for name in ("upsd", "driver"):
            self.stop(name)

    def get(self, variable: str) -> str:
        """One variable straight from upsd, without the probe's code."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"GET VAR kit {variable}\n".encode())
            line = sock.makefile("rb").readline().decode().strip()
        return line.split('"')[1] if line.startswith("VAR") else line


MAINS = MappingProxyType({"ups.status": "OL", "battery.charge": "100", "ups.load": "14", "input.voltage": "226.0",
         "output.voltage": "226.0", "input.frequency": "50.0", "battery.voltage": "27.30",
         "ups.temperature": "30.5"})


@pytest.fixture
def nut(tmp_path):
    server = NutServer(tmp_path / "nut")
    server.write_dev(**MAINS)
    try:
        yield server.start()
    finally:
        server.close()


def test_nut_follows_a_real_upsd(nut, tmp_path):
    password = tmp_path / "nut.pw"
    password.write_text("rahasia\n")
    password.chmod(0o600)
    p = make_probe(driver="nut", ups="kit", port=nut.port, reply_timeout=2.0, username="monitor",
                   password_file=str(password))
    entry = on_wire(wait_for(lambda: (e := p.run()).s == "ok" and e, timeout=15, what="upsd to serve kit"))
    assert (entry.via, entry.on_batt, entry.batt_low, entry.charge, entry.load) == ("nut", False, False, 1.0, 0.14)
    assert (entry.in_v, entry.out_v, entry.in_hz, entry.batt_v, entry.temp) == (226.0, 226.0, 50.0, 27.3, 30.5)
    assert entry.model == nut.get("device.model") and entry.vendor == nut.get("device.mfr")

    nut.write_dev(**{**MAINS, "ups.status": "OB DISCHRG", "battery.charge": "64", "input.voltage": "0.0"})
    entry = on_wire(wait_for(lambda: (e := p.run()).on_batt and e, timeout=15, what="upsd to report OB"))
    assert (entry.s, entry.c, entry.charge, entry.in_v) == ("warn", "on_battery", 0.64, 0.0)

    nut.write_dev(**{**MAINS, "ups.status": "OB LB", "battery.charge": "9", "input.voltage": "0.0"})
    entry = on_wire(wait_for(lambda: (e := p.run()).batt_low and e, timeout=15, what="upsd to report LB"))
    assert (entry.s, entry.c, entry.on_batt, entry.charge) == ("error", "battery_low", True, 0.09)

    nut.write_dev(**MAINS)
    wait_for(lambda: p.run().s == "ok", timeout=15, what="mains back")


def test_nut_errors_from_a_real_upsd(nut):
    good = make_probe(driver="nut", ups="kit", port=nut.port, reply_timeout=2.0)
    wait_for(lambda: good.run().s == "ok", timeout=15, what="upsd to serve kit")

    entry = on_wire(make_probe(driver="nut", ups="nosuch", port=nut.port, reply_timeout=2.0).run())
    assert (entry.s, entry.c) == ("error", "daemon_error") and "UNKNOWN-UPS" in entry.m

    nut.stop("driver")  # the UPS driver dies; upsd stays up but has no data
    entry = on_wire(wait_for(lambda: (e := good.run()).c == "no_reply" and e, timeout=15,
                             what="upsd to notice the driver is gone"))
    assert entry.s == "error" and ("DRIVER-NOT-CONNECTED" in entry.m or "DATA-STALE" in entry.m)

    nut.stop("upsd")
    entry = on_wire(good.run())
    assert (entry.s, entry.c) == ("error", "daemon_unreachable") and str(nut.port) in entry.m


def test_nut_password_file_unreadable_is_an_error_entry(tmp_path):
    p = make_probe(driver="nut", ups="kit", port=free_port(), username="monitor",
                   password_file=str(tmp_path / "missing.pw"))
    entry = on_wire(p.run())
    assert (entry.s, entry.c) == ("error", "probe_failed") and "missing.pw" in entry.m


def nutdrv_qx_dump(port: str, workdir: Path, *extra: str) -> dict[str, str]:
    """What NUT's own Megatec driver reads from a serial port (one update, then it exits)."""
    env = {**os.environ, "NUT_STATEPATH": str(workdir), "NUT_CONFPATH": str(workdir),
           "NUT_ALTPIDPATH": str(workdir)}
    done = subprocess.run([_find("nutdrv_qx"), "-s", "emu", "-x", f"port={port}", "-x", "protocol=megatec",
                           "-u", getpass.getuser(), "-d", "1", *extra],
                          capture_output=True, text=True, timeout=60, env=env, cwd=workdir)
    assert done.returncode == 0, done.stderr
    return dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)


@pytest.mark.parametrize("per_cell", [False, True])
@pytest.mark.parametrize("mode", ["mains", "mains_failure", "battery_low"])
def test_megatec_probe_agrees_with_nut_on_the_emulator(tmp_path, probe_factory, mode, per_cell):
    """NUT's nutdrv_qx is an independent reading of the same protocol: emulator and parser agree with it."""
    ups = MegatecUps(mode, per_cell=per_cell)
    # NUT 2.8's nutdrv_qx guesses the cell count only with runtimecal set; tell it instead.
    extra = ("-x", "default.battery.packs=12") if per_cell else ()
    with MegatecPty(ups) as pty:
        nut = nutdrv_qx_dump(pty.path, tmp_path, *extra)
        entry = probe_factory(port=pty.path, reply_timeout=0.5).run()
    tokens = nut["ups.status"].split()
    assert (entry.on_batt, entry.batt_low) == ("OB" in tokens, "LB" in tokens)
    assert (entry.in_v, entry.out_v, entry.in_hz) == (float(nut["input.voltage"]), float(nut["output.voltage"]),
                                                      float(nut["input.frequency"]))
    assert entry.load == float(nut["ups.load"]) / 100 and entry.temp == float(nut["ups.temperature"])
    # the probe reports the whole battery; nutdrv_qx shows the reading and its multiple apart
    whole = float(nut["battery.voltage"]) * float(nut.get("battery.packs", 1))
    assert entry.batt_v == pytest.approx(whole, abs=0.01)
    assert entry.charge == pytest.approx(float(nut["battery.charge"]) / 100, abs=0.006)  # NUT rounds to 1 %
    assert (entry.vendor, entry.model) == (nut["device.mfr"], nut["device.model"])


# ---------------------------------------------------------------------------------------------
# apcupsd NIS: a loopback responder speaking the length-prefixed protocol

ONLINE = """APC      : 001,036,0871
DATE     : 2024-03-18 10:02:11 +0700
UPSNAME  : kit-1
MODEL    : Back-UPS BX1100LI
STATUS   : ONLINE
LINEV    : 228.0 Volts
LOADPCT  : 12.0 Percent
BCHARGE  : 100.0 Percent
TIMELEFT : 41.5 Minutes
OUTPUTV  : 228.0 Volts
ITEMP    : 29.2 C
BATTV    : 13.5 Volts
LINEFREQ : 50.0 Hz
SELFTEST : NO
END APC  : 2024-03-18 10:02:30 +0700
"""


class NisResponder:
    """Answers `status` with one record per line and a zero-length end record, like apcupsd."""

    def __init__(self, status: str = ONLINE):
        self.status = status
        self.behaviour = "normal"  # or "close_early", "silent", "oversized"
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                request = self.request.recv(8)
                if request != b"\x00\x06status":
                    return
                if outer.behaviour == "silent":
                    outer.release.wait(10)
                    return
                if outer.behaviour == "oversized":
                    self.request.sendall(b"\xff\xff" + b"x" * 100)
                    return
                lines = outer.status.splitlines(keepends=True)
                if outer.behaviour == "close_early":
                    lines = lines[:3]
                for line in lines:
                    data = line.encode()
                    self.request.sendall(len(data).to_bytes(2, "big") + data)
                if outer.behaviour == "normal":
                    self.request.sendall(b"\x00\x00")

        self.release = threading.Event()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nis():
    responder = NisResponder()
    yield responder
    responder.close()


def test_apcupsd_online(nis):
    entry = on_wire(make_probe(driver="apcupsd", port=nis.port, reply_timeout=2.0).run())
    assert (entry.s, entry.c, entry.via, entry.on_batt, entry.batt_low) == ("ok", "", "apcupsd", False, False)
    assert (entry.in_v, entry.out_v, entry.in_hz, entry.load, entry.charge) == (228.0, 228.0, 50.0, 0.12, 1.0)
    assert (entry.batt_v, entry.temp, entry.model, entry.failed) == (13.5, 29.2, "Back-UPS BX1100LI", False)


@pytest.mark.parametrize("status, expect", [
    ("ONBATT", ("warn", "on_battery", True, False)),
    ("ONBATT LOWBATT", ("error", "battery_low", True, True)),
    ("ONLINE REPLACEBATT", ("warn", "replace_battery", False, False)),
    ("SHUTTING DOWN", ("error", "ups_shutdown", None, False)),
    ("COMMLOST", ("error", "no_reply", None, None)),
])
def test_apcupsd_states(nis, status, expect):
    nis.status = ONLINE.replace("STATUS   : ONLINE", f"STATUS   : {status}")
    entry = on_wire(make_probe(driver="apcupsd", port=nis.port, reply_timeout=2.0).run())
    assert (entry.s, entry.c, entry.on_batt, entry.batt_low) == expect


def test_apcupsd_failed_self_test_is_ups_failed():
    fields = parse_apcupsd_status(ONLINE.replace("SELFTEST : NO", "SELFTEST : BT"))
    assert apcupsd_reading(fields).failed is True
    with pytest.raises(ProtocolError):
        parse_apcupsd_status("MODEL    : Back-UPS\n")
    with pytest.raises(ProtocolError):
        apcupsd_reading({"STATUS": ""})


@pytest.mark.parametrize("behaviour", ["close_early", "oversized"])
def test_apcupsd_broken_reply_is_an_error_entry(nis, behaviour):
    nis.behaviour = behaviour
    entry = on_wire(make_probe(driver="apcupsd", port=nis.port, reply_timeout=2.0).run())
    assert (entry.s, entry.c) == ("error", "garbled_reply")


def test_apcupsd_silent_or_absent_server(nis):
    nis.behaviour = "silent"
    start = time.monotonic()
    entry = on_wire(make_probe(driver="apcupsd", port=nis.port, reply_timeout=0.5).run())
    assert (entry.s, entry.c) == ("error", "daemon_unreachable") and "timed out" in entry.m
    assert time.monotonic() - start < 2.0
    entry = on_wire(make_probe(driver="apcupsd", port=free_port(), reply_timeout=0.5).run())
    assert (entry.s, entry.c) == ("error", "daemon_unreachable")


def test_change_key_carries_power_flags():
    p = make_probe(driver="apcupsd")
    mains = wire.UpsEntry(s="warn", c="replace_battery", on_batt=False, batt_low=False)
    outage = msgspec.structs.replace(mains, on_batt=True)
    assert p.change_key(mains) != p.change_key(outage)


def test_every_code_in_the_source_is_declared():
    """agent/messages.py words every declared code; an undeclared one would reach people bare."""
    source = (Path(__file__).resolve().parent.parent / "agent" / "probes" / "ups.py").read_text()
    used = set(re.findall(r'(?:_error|UpsError)\("([a-z_]+)"', source))
    used |= set(re.findall(r'"(?:error|warn)", "([a-z_]+)"', source))
    used |= set(re.findall(r'code = "([a-z_]+)"', source))
    assert used and used <= set(UpsProbe.codes) | set(UpsProbe.RUNNER_CODES), sorted(used - set(UpsProbe.codes))
