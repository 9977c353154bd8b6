"""agent/identity.py: when an entry carries its identity in full and when it points back with idref.

Through the runner (injected clock, every rule in one place) and the tracker alone for the edges.
"""

import msgspec
import pytest
from msgspec import Struct

from agent import wire
from agent.identity import IdentityTracker
from agent.probes.base import Probe, ProbeContext
from agent.runner import InlineExecutor, Runner, Slot
from test_runner import KIT, FakeClock, drive

FP = dict(vid="05ba", pid="000a", vendor="DigitalPersona", product="U.are.U 4500", serial="JX3A012345",
          bus="1-1.2", driver="usb")
UPS_ID = dict(vendor="EMULATED UPS", model="MEGA-1000")


class Device(Probe):
    """A device probe whose entry (state and identity) the test sets."""

    type_name = "device"
    entry_type = wire.DeviceEntry

    class Options(Struct):
        pass

    def __init__(self, name, **identity):
        super().__init__(name, None, ProbeContext())
        self.entry = wire.DeviceEntry(s="ok", count=1, **identity)

    def run(self):
        return self.entry

    def change_key(self, entry):
        return (entry.s, entry.c, getattr(entry, "serial", None))


class Ups(Device):
    type_name = "ups-test"
    entry_type = wire.UpsEntry

    def __init__(self, name, **identity):
        Probe.__init__(self, name, None, ProbeContext())
        self.entry = wire.UpsEntry(s="ok", load=0.2, via="megatec", **identity)


def make(clock, probes, heartbeat=60, **kw):
    reports = []
    runner = Runner(KIT, [Slot(p, 10.0, 5.0) for p in probes], heartbeat, reports.append, clock=clock,
                    executor=InlineExecutor(), boot="00112233aabbccdd", **kw)
    return runner, reports


def identity(entry) -> dict:
    return {f: getattr(entry, f) for f in wire.IDENTITY_FIELDS[type(entry)]}


def full(entry) -> bool:
    return entry.idref is None and any(v is not None for v in identity(entry).values())


def test_first_report_full_then_idref_with_identity_left_out():
    clock = FakeClock()
    fp, ups = Device("fingerprint", **FP), Ups("ups", **UPS_ID)
    runner, reports = make(clock, [fp, ups])
    drive(runner, clock, 181)
    assert [r.seq for r in reports] == [1, 2, 3, 4]
    first = reports[0]
    assert (first.p["fingerprint"].idref, identity(first.p["fingerprint"])) == (None, FP)
    assert (first.p["ups"].idref, identity(first.p["ups"])) == (None, UPS_ID)
    for report in reports[1:]:
        dev, u = report.p["fingerprint"], report.p["ups"]
        assert dev.idref == 1 and set(identity(dev).values()) == {None}
        assert u.idref == 1 and set(identity(u).values()) == {None}
        # everything else is sent as always
        assert (dev.s, dev.count, u.load, u.via) == ("ok", 1, 0.2, "megatec")
    # the probe's own result keeps its identity: change keys and the next report see it
    assert runner.slots[0].latest.serial == FP["serial"] and runner.slots[0].latest.idref is None


def test_on_the_wire_an_idref_entry_is_small_and_decodes():
    clock = FakeClock()
    runner, reports = make(clock, [Device("fingerprint", **FP)])
    drive(runner, clock, 61)
    data = wire.encode(reports[1])
    assert b'"fingerprint":{"k":"dev","s":"ok","count":1,"idref":1}' in data
    for compress in (False, True):
        assert wire.decode_report(wire.encode(reports[1], compress=compress), KIT) == reports[1]


def test_changed_identity_goes_in_full_at_once_and_later_entries_point_to_it():
    clock = FakeClock()
    fp = Device("fingerprint", **FP)
    runner, reports = make(clock, [fp])
    drive(runner, clock, 65)  # reports 1 (full) and 2 (idref 1)
    fp.entry = msgspec.structs.replace(fp.entry, serial="JX3A099999")  # a unit lent from elsewhere
    drive(runner, clock, 10)
    assert len(reports) == 3, "the serial is in the change key: reported at once"
    assert full(reports[2].p["fingerprint"]) and reports[2].p["fingerprint"].serial == "JX3A099999"
    fp.entry = msgspec.structs.replace(fp.entry, bus="1-1.3")  # not in the change key: next heartbeat
    drive(runner, clock, 60)
    assert len(reports) == 4 and full(reports[3].p["fingerprint"]) and reports[3].p["fingerprint"].bus == "1-1.3"
    drive(runner, clock, 60)
    assert reports[4].p["fingerprint"].idref == 4
    # a field becoming unknown is a change too
    fp.entry = msgspec.structs.replace(fp.entry, driver=None)
    drive(runner, clock, 60)
    assert full(reports[5].p["fingerprint"]) and reports[5].p["fingerprint"].driver is None


def test_no_identity_no_idref_and_the_same_unit_back_points_to_its_report():
    clock = FakeClock()
    fp = Device("fingerprint", **FP)
    present = fp.entry
    runner, reports = make(clock, [fp])
    drive(runner, clock, 5)
    fp.entry = wire.DeviceEntry(s="missing", c="not_detected", count=0)
    drive(runner, clock, 10)
    fp.entry = present
    drive(runner, clock, 10)
    assert [r.p["fingerprint"].s for r in reports] == ["ok", "missing", "ok"]
    missing = reports[1].p["fingerprint"]
    assert missing.idref is None and set(identity(missing).values()) == {None}
    assert reports[2].p["fingerprint"].idref == 1


def test_refresh_period_sends_the_identity_in_full_again():
    clock = FakeClock()
    runner, reports = make(clock, [Device("fingerprint", **FP), Ups("ups", **UPS_ID)])  # default 900 s
    drive(runner, clock, 3600)
    assert len(reports) == 60
    fulls = [r.seq for r in reports if full(r.p["fingerprint"])]
    assert fulls == [1, 16, 31, 46], "once every 900 s: every 15th report at a 60 s heartbeat"
    assert fulls == [r.seq for r in reports if full(r.p["ups"])]
    for r in reports:
        if r.seq not in fulls:
            assert r.p["fingerprint"].idref == max(s for s in fulls if s < r.seq)


def test_refresh_is_configurable_and_zero_means_always_full():
    clock = FakeClock()
    runner, reports = make(clock, [Device("fingerprint", **FP)], identity_refresh=300)
    drive(runner, clock, 1200)
    assert [r.seq for r in reports if full(r.p["fingerprint"])] == [1, 6, 11, 16]
    clock = FakeClock()
    runner, reports = make(clock, [Device("fingerprint", **FP), Ups("ups", **UPS_ID)], identity_refresh=0)
    drive(runner, clock, 600)
    assert len(reports) == 10
    assert all(full(r.p["fingerprint"]) and full(r.p["ups"]) for r in reports)


def test_identity_is_per_probe_and_per_boot():
    clock = FakeClock()
    a, b = Device("fingerprint", **FP), Device("iris", **FP)
    runner, reports = make(clock, [a, b])
    drive(runner, clock, 65)
    b.entry = msgspec.structs.replace(b.entry, serial="OTHER")
    drive(runner, clock, 10)
    last = reports[-1]
    assert (last.p["fingerprint"].idref, full(last.p["iris"])) == (1, True)
    # a new runner is a new boot: it starts with every identity in full
    runner2, reports2 = make(clock, [Device("fingerprint", **FP)])
    runner2.step()
    assert full(reports2[0].p["fingerprint"])


def test_tracker_entry_type_change_resets():
    t = IdentityTracker()
    dev = wire.DeviceEntry(s="ok", vendor="X")
    ups = wire.UpsEntry(s="ok", vendor="X")
    assert t.apply("thing", dev, 1, 0.0) is dev
    assert t.apply("thing", dev, 2, 1.0).idref == 1
    assert t.apply("thing", ups, 3, 2.0) is ups, "another entry kind: in full, even with the same values"
    assert t.apply("thing", ups, 4, 3.0).idref == 3
    host = wire.HostEntry(s="ok")
    assert t.apply("thing", host, 5, 4.0) is host
    assert t.apply("thing", ups, 6, 5.0) is ups, "a kind without identity in between resets too"


def test_tracker_never_passes_an_idref_it_did_not_make():
    t = IdentityTracker()
    stray = wire.DeviceEntry(s="ok", vendor="X", idref=7)
    assert t.apply("fp", stray, 1, 0.0).idref is None
    assert t.apply("fp", wire.DeviceEntry(s="error", idref=7), 2, 1.0).idref is None
    with pytest.raises(ValueError):
        IdentityTracker(-1)


def test_an_older_decoder_ignores_idref():
    """A collector built before idref (these structs without the field) sees an entry without identity."""

    class OldEntry(Struct, tag_field="k", omit_defaults=True, forbid_unknown_fields=False):
        s: str

    class OldDev(OldEntry, tag="dev"):
        vid: str | None = None
        serial: str | None = None

    class OldReport(Struct, forbid_unknown_fields=False):
        v: int
        p: dict[str, OldDev]

    data = wire.encode(wire.Report(v=1, kab="sintang", kec="dedai", kit="kit-1", ts=1.0, boot="00112233aabbccdd",
                                   seq=2, hb=60, p={"fingerprint": wire.DeviceEntry(s="ok", idref=1)}))
    assert msgspec.json.decode(data, type=OldReport).p["fingerprint"] == OldDev(s="ok")
