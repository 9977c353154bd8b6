"""Fleet state and rules, driven by hand-made messages and an explicit clock."""

import msgspec
import pytest

from agent import wire
from collector.config import CollectorConfig
from collector.fleet import Fleet, KitRecord, Ledger, Refused

KIT = wire.KitId("sintang", "dedai", "kit-1")
T0 = 1_800_000_000.0
DEVICES = ("fingerprint", "iris", "camera", "signature_pad")


def config(**fleet) -> CollectorConfig:
    return msgspec.convert({
        "broker": {"url": "mqtt://127.0.0.1"},
        "fleet": fleet,
        "inventory": {"sintang": {"kecamatan": {"dedai": {"kits": ["kit-1", "kit-2"], "lat": 0.1, "lon": 111.2}}}},
    }, CollectorConfig)


def status(state="online", boot="aaaaaaaa", **kw):
    return wire.Status(v=1, state=state, boot=boot, hb=60, agent="0.1.0", host="pc", os="linux", **kw)


def report(seq, boot="aaaaaaaa", ts=T0, replay=False, kit=KIT, **states):
    entries = {name: wire.DeviceEntry(s=states.get(name, "ok"), serial=f"SN-{name}") for name in DEVICES}
    entries["ups"] = wire.UpsEntry(s="ok", on_batt=states.get("on_batt", False), batt_low=False)
    entries["link"] = wire.LinkEntry(s="ok", targets={"district": wire.LinkTarget(up=states.get("link", True))})
    return wire.Report(v=1, kab=kit.kabupaten, kec=kit.kecamatan, kit=kit.kit, ts=ts, boot=boot, seq=seq, hb=60,
                       p=entries, replay=replay)


def kinds(events):
    return [(e.kind, e.subject, e.old, e.new) for e in events]


def test_expected_kits_exist_before_any_message():
    fleet = Fleet(config())
    fleet.sweep(T0)
    kits = {k.id: k for k in fleet.snapshot()}
    assert set(kits) == {KIT, wire.KitId("sintang", "dedai", "kit-2")}
    assert not any(k.online or k.ready for k in kits.values())
    assert all(k.expected and k.ready_changed == T0 for k in kits.values())
    assert fleet.coords[("sintang", "dedai")] == (0.1, 111.2)


def test_online_and_ready_need_status_and_a_fresh_report():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    assert not fleet.get(KIT).online, "a retained 'online' alone proves nothing"
    events = fleet.apply_report(report(1), T0 + 1)
    kit = fleet.get(KIT)
    assert kit.online and kit.ready
    assert ("ready", "", "not_ready", "ready") in kinds(events)
    # three heartbeats of silence: offline, though the status still says online
    assert fleet.sweep(T0 + 1 + 180) == []
    events = fleet.sweep(T0 + 1 + 181)
    assert ("online", "", "online", "offline") in kinds(events)
    assert ("ready", "", "ready", "not_ready") in kinds(events)
    assert events[-1].detail == "offline"


def test_missing_device_makes_kit_not_ready_and_says_which():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    fleet.apply_report(report(1), T0)
    events = fleet.apply_report(report(2, iris="missing"), T0 + 5)
    assert ("device", "iris", "ok", "missing") in kinds(events)
    ready = [e for e in events if e.kind == "ready"][0]
    assert (ready.new, ready.detail) == ("not_ready", "iris")
    kit = fleet.get(KIT)
    assert not kit.ready and kit.device_changed["iris"] == T0 + 5


def test_ups_and_link_are_not_required_by_default_but_make_events():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    fleet.apply_report(report(1), T0)
    events = fleet.apply_report(report(2, on_batt=True, link=False), T0 + 5)
    assert ("power", "ups", "mains", "battery") in kinds(events)
    assert ("link", "district", "up", "down") in kinds(events)
    assert fleet.get(KIT).ready


def test_required_set_is_configurable():
    fleet = Fleet(config(required_devices=["fingerprint", "ups"]))
    fleet.apply_status(KIT, status(), T0)
    fleet.apply_report(report(1, iris="missing"), T0)
    assert fleet.get(KIT).ready


def test_offline_will_ends_online_at_once():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    fleet.apply_report(report(1), T0)
    events = fleet.apply_status(KIT, status("offline", reason="lost"), T0 + 10)
    assert ("online", "", "online", "offline") in kinds(events)


def test_late_will_of_an_earlier_run_is_ignored():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(boot="bbbbbbbb"), T0)
    fleet.apply_report(report(1, boot="bbbbbbbb"), T0)
    assert fleet.apply_status(KIT, status("offline", boot="aaaaaaaa", reason="lost"), T0 + 1) == []
    assert fleet.get(KIT).online


def test_duplicates_dropped_by_boot_and_seq():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    assert fleet.apply_report(report(1), T0)
    assert fleet.apply_report(report(1), T0 + 1) == []
    kit = fleet.get(KIT)
    assert (kit.reports, kit.duplicates) == (1, 1)


def test_replay_goes_to_history_but_never_moves_state_back():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    fleet.apply_report(report(1), T0)
    # outage: seq 2..4 queued on the kit; seq 5 (live, iris now fine) arrives first after reconnect
    fleet.apply_report(report(5, ts=T0 + 400), T0 + 500)
    events = []
    for seq, iris in ((2, "ok"), (3, "missing"), (4, "missing")):
        events += fleet.apply_report(report(seq, ts=T0 + seq * 100, replay=True, iris=iris), T0 + 501)
    kit = fleet.get(KIT)
    assert kit.seq == 5 and kit.entries["iris"].s == "ok" and kit.ready, "the current state stays at seq 5"
    replayed = [e for e in events if e.replayed]
    assert [(e.kind, e.subject, e.old, e.new, e.agent_ts) for e in replayed] == [
        ("device", "iris", "ok", "missing", T0 + 300)
    ]
    assert kit.replayed == 3
    assert kit.ledgers["aaaaaaaa"].ranges == [[1, 5]]


def test_new_boot_takes_over_and_old_backlog_is_history_only():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(boot="aaaaaaaa"), T0)
    fleet.apply_report(report(1, boot="aaaaaaaa"), T0)
    fleet.apply_status(KIT, status(boot="bbbbbbbb"), T0 + 100)
    fleet.apply_report(report(1, boot="bbbbbbbb", iris="missing"), T0 + 100)
    fleet.apply_report(report(2, boot="aaaaaaaa", replay=True), T0 + 101)
    kit = fleet.get(KIT)
    assert (kit.boot, kit.seq, kit.entries["iris"].s) == ("bbbbbbbb", 1, "missing")


def test_swapped_unit_is_an_identity_event():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    fleet.apply_report(report(1), T0)
    swapped = report(2)
    swapped.p["fingerprint"] = wire.DeviceEntry(s="ok", serial="LENT-FROM-SEPAUK")
    events = fleet.apply_report(swapped, T0 + 1)
    assert ("identity", "fingerprint", "SN-fingerprint", "LENT-FROM-SEPAUK") in kinds(events)


def test_unknown_kits_policy_and_cap():
    stranger = wire.KitId("sintang", "sepauk", "kit-9")
    refusing = Fleet(config(unknown_kits="refuse"))
    with pytest.raises(Refused) as err:
        refusing.apply_report(report(1, kit=stranger), T0)
    assert err.value.reason == "unknown_kit"
    capped = Fleet(config(max_kits=2))
    with pytest.raises(Refused) as err:
        capped.apply_report(report(1, kit=stranger), T0)
    assert err.value.reason == "capacity"
    accepting = Fleet(config())
    accepting.apply_report(report(1, kit=stranger), T0)
    assert not accepting.get(stranger).expected


@pytest.mark.parametrize("skew", [-401 * 86400, 3 * 86400])
def test_absurd_timestamps_refused(skew):
    fleet = Fleet(config())
    with pytest.raises(Refused) as err:
        fleet.apply_report(report(1, ts=T0 + skew), T0)
    assert err.value.reason == "clock"


@pytest.mark.parametrize("jump", [-6 * 3600, 6 * 3600])
def test_kit_clock_jump_does_not_change_liveness(jump):
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    fleet.apply_report(report(1, ts=T0), T0)
    fleet.apply_report(report(2, ts=T0 + 60 + jump), T0 + 60)
    fleet.sweep(T0 + 120)
    assert fleet.get(KIT).online and fleet.get(KIT).ready


def test_ledger_merges_ranges_and_finds_gaps():
    ledger = Ledger()
    for seq in [1, 2, 3, 7, 5, 6, 10]:
        assert ledger.add(seq)
    assert ledger.ranges == [[1, 3], [5, 7], [10, 10]]
    assert not ledger.add(6)
    assert ledger.gaps() == [(4, 4), (8, 9)]
    for seq in (4, 8, 9):
        ledger.add(seq)
    assert ledger.ranges == [[1, 10]] and ledger.count() == 10


def test_first_backlog_report_is_compared_with_the_state_before_the_gap():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    fleet.apply_report(report(1), T0)
    fleet.apply_report(report(4, ts=T0 + 300), T0 + 400)  # live after the outage: seq 2, 3 missing
    events = fleet.apply_report(report(2, ts=T0 + 100, replay=True, link=False), T0 + 401)
    events += fleet.apply_report(report(3, ts=T0 + 200, replay=True), T0 + 401)
    assert [(e.kind, e.old, e.new, e.agent_ts, e.replayed) for e in events if e.kind == "link"] == [
        ("link", "up", "down", T0 + 100, True), ("link", "down", "up", T0 + 200, True)]


def test_in_order_backlog_events_are_flagged_replayed():
    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    fleet.apply_report(report(1), T0)
    events = fleet.apply_report(report(2, ts=T0 + 100, replay=True, iris="missing"), T0 + 500)
    device = [e for e in events if e.kind == "device"][0]
    assert (device.subject, device.replayed, device.agent_ts) == ("iris", True, T0 + 100)


def test_store_keeps_reports_taken_in_a_journal_until_the_ledgers_are_folded(tmp_path):
    # One journal row per batch instead of an upsert per kit; a restart between folds still
    # knows every report taken, so a redelivered one is a duplicate.
    from collector.store import Store

    store = Store(tmp_path / "c.sqlite")
    kit = wire.KitId("sintang", "dedai", "kit-1")
    store.write([], [(kit, "aaaaaaaa", 1), (kit, "aaaaaaaa", 2)], [(kit, KitRecord(boot="aaaaaaaa", seq=2))], T0)
    store.write([], [(kit, "aaaaaaaa", 4)], [], T0 + 1)
    assert store.ledger(kit) == {"aaaaaaaa": [[1, 2], [4, 4]]}
    [(_, record, ledgers)] = Store(tmp_path / "c.sqlite").load_kits()
    assert record.seq == 2 and ledgers["aaaaaaaa"].ranges == [[1, 2], [4, 4]]
    store.write([], [(kit, "aaaaaaaa", 3)], [], T0 + 2, ledgers=[(kit, "aaaaaaaa", Ledger([[1, 4]]))])
    assert store._db.execute("SELECT count(*) FROM seen").fetchone() == (0,)
    assert Store(tmp_path / "c.sqlite").ledger(kit) == {"aaaaaaaa": [[1, 4]]}


def test_identity_left_out_by_reference_is_filled_in_never_guessed():
    # The agent's IdentityTracker makes the reports, as on the wire; the fleet shows full entries.
    from agent.identity import IdentityTracker

    tracker = IdentityTracker(refresh=900)
    fingerprint = wire.DeviceEntry(s="ok", vid="05ba", pid="000a", vendor="DigitalPersona", serial="FP-1")
    ups = wire.UpsEntry(s="ok", on_batt=False, vendor="EMULATED UPS", model="MEGA-1000")

    def made(seq, fp=fingerprint, replay=False):
        p = {"fingerprint": tracker.apply("fingerprint", fp, seq, seq * 60.0),
             "ups": tracker.apply("ups", ups, seq, seq * 60.0)}
        return wire.decode_report(wire.encode(wire.Report(v=1, kab="sintang", kec="dedai", kit="kit-1", ts=T0,
                                                          boot="aaaaaaaa", seq=seq, hb=60, p=p, replay=replay)))

    wire_reports = [made(seq) for seq in range(1, 5)]
    assert wire_reports[1].p["fingerprint"].idref == 1 and wire_reports[1].p["fingerprint"].serial is None

    fleet = Fleet(config())
    fleet.apply_status(KIT, status(), T0)
    for r in wire_reports[:2]:
        assert not [e for e in fleet.apply_report(r, T0) if e.kind == "identity"]
    kit = fleet.get(KIT)
    assert kit.entries["fingerprint"].serial == "FP-1" and kit.entries["ups"].model == "MEGA-1000"

    # a restarted collector keeps what the references point at
    restored = Fleet(config())
    restored.restore(KIT, fleet.take_dirty()[0][1], {})
    restored.apply_report(wire_reports[2], T0)
    assert restored.get(KIT).entries["fingerprint"].serial == "FP-1"

    # a reference to a report not received yet: no identity shown, until that report arrives
    other = Fleet(config())
    other.apply_status(KIT, status(), T0)
    other.apply_report(wire_reports[3], T0)  # live first after an outage; refers to seq 1
    assert other.get(KIT).entries["fingerprint"].serial is None
    other.apply_report(msgspec.structs.replace(wire_reports[0], replay=True), T0)
    assert other.get(KIT).entries["fingerprint"].serial == "FP-1"

    # a backlog with its own full identities, interleaved with live reports: both resolve, and
    # one identity per probe and stream is all that is kept
    backlog_tracker, live_tracker = IdentityTracker(refresh=900), IdentityTracker(refresh=900)

    def stream(tracker_, seq, replay):
        p = {"fingerprint": tracker_.apply("fingerprint", fingerprint, seq, seq * 60.0)}
        return wire.decode_report(wire.encode(wire.Report(v=1, kab="sintang", kec="dedai", kit="kit-1", ts=T0,
                                                          boot="bbbbbbbb", seq=seq, hb=60, p=p, replay=replay)))

    mixed = Fleet(config())
    mixed.apply_status(KIT, status(), T0)
    for back, live in zip(range(1, 40), range(100, 140)):
        mixed.apply_report(stream(live_tracker, live, False), T0)
        assert mixed.get(KIT).entries["fingerprint"].serial == "FP-1"
        backlog = mixed.apply_report(stream(backlog_tracker, back, True), T0)
        assert not [e for e in backlog if e.kind == "identity"]
    kept = mixed.get(KIT)
    assert kept.entries["fingerprint"].idref == 130  # the agent refreshes every 15 cycles here
    assert kept.replay_idents["fingerprint"][:2] == ("bbbbbbbb", 31) and kept.idents == {}

    # unplugged and plugged back: the agent refers to the identity sent before, which the kit
    # no longer showed in between
    replug = IdentityTracker(refresh=900)
    unplugged = wire.DeviceEntry(s="missing", c="not_found")

    def plug(seq, fp):
        p = {"fingerprint": replug.apply("fingerprint", fp, seq, seq * 10.0)}
        return wire.decode_report(wire.encode(wire.Report(v=1, kab="sintang", kec="dedai", kit="kit-1", ts=T0,
                                                          boot="cccccccc", seq=seq, hb=60, p=p)))

    plugged = Fleet(config())
    plugged.apply_status(KIT, status(), T0)
    for seq, fp in enumerate([fingerprint, fingerprint, unplugged, fingerprint, fingerprint], start=1):
        plugged.apply_report(plug(seq, fp), T0)
        if seq == 3:
            assert plugged.get(KIT).idents["fingerprint"][:2] == ("cccccccc", 1)
            restarted = Fleet(config())
            restarted.restore(KIT, plugged.take_dirty()[0][1], {})
            plugged = restarted
    replugged = plugged.get(KIT)
    assert replugged.entries["fingerprint"].idref == 1 and replugged.entries["fingerprint"].serial == "FP-1"
    assert replugged.idents == {}

    # a swapped unit is sent in full, and is an identity change
    swapped = made(5, fp=msgspec.structs.replace(fingerprint, serial="FP-2"))
    assert swapped.p["fingerprint"].idref is None
    events = fleet.apply_report(swapped, T0)
    assert ("identity", "fingerprint", "FP-1", "FP-2") in kinds(events)


def test_text_that_repeats_across_the_fleet_is_held_once():
    # Each decoded report brings its own copies of the same strings; a national fleet keeps one.
    fleet = Fleet(config())
    kit2 = wire.KitId("sintang", "dedai", "kit-2")
    for kit in (KIT, kit2):
        fleet.apply_status(kit, status(), T0)
        r = report(1, kit=kit)
        r.p["fingerprint"] = wire.DeviceEntry(s="ok", vendor="DigitalPersona, Inc.", serial=f"SN-{kit.kit}")
        r.p["link"] = wire.LinkEntry(s="ok", targets={"district": wire.LinkTarget(up=True)}, ifaces={"eth0": True})
        fleet.apply_report(wire.decode_report(wire.encode(r)), T0)
    one, two = fleet.get(KIT), fleet.get(kit2)
    assert one.entries["fingerprint"].vendor is two.entries["fingerprint"].vendor
    assert next(iter(one.entries)) is next(iter(two.entries))
    assert next(iter(one.entries["link"].targets)) is next(iter(two.entries["link"].targets))
    assert next(iter(one.entries["link"].ifaces)) is next(iter(two.entries["link"].ifaces))
    assert one.entries["fingerprint"].serial == "SN-kit-1" and two.entries["fingerprint"].serial == "SN-kit-2"

    # an entry that did not change is the one the kit already holds
    before = one.entries["fingerprint"]
    again = report(2)
    again.p["fingerprint"] = wire.DeviceEntry(s="ok", vendor="DigitalPersona, Inc.", serial="SN-kit-1")
    fleet.apply_report(wire.decode_report(wire.encode(again)), T0)
    assert fleet.get(KIT).entries["fingerprint"] is before
