"""The /metrics exposition in-process: every sample of a varied fleet, text format validity
(prometheus_client's parser and promtool), escaping, duplicates, and kits that leave.

The end-to-end tests (test_collector.py, test_dashboards.py) run it through a real collector and
Prometheus; these build a Fleet directly, so they can set up shapes no agent sends (two host or link
probes in one kit, label values with quotes, a kit removed from the fleet)."""

from __future__ import annotations

import shutil
import subprocess
import time

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import wire
from collector import metrics
from collector.config import CollectorConfig
from collector.fleet import Fleet

NOW = time.time()
BOOT = "0123456789abcdef"


def make_fleet(required=("fingerprint", "iris", "camera", "signature_pad"), inventory=None) -> Fleet:
    config = msgspec.convert({"broker": {"url": "mqtt://127.0.0.1:1883"},
                              "fleet": {"required_devices": list(required)},
                              "inventory": inventory or {}}, CollectorConfig)
    return Fleet(config)


def report(kit: wire.KitId, seq: int, entries: dict, q=wire.QueueStats(0, 0)) -> wire.Report:
    return wire.Report(v=1, kab=kit.kabupaten, kec=kit.kecamatan, kit=kit.kit, ts=round(NOW, 3), boot=BOOT,
                       seq=seq, hb=60, p=entries, q=q)


def online(fleet: Fleet, kit: wire.KitId, entries: dict, at: float = NOW, **kw) -> None:
    fleet.apply_status(kit, wire.Status(v=1, state="online", boot=BOOT, ts=at, agent="0.1.0", connects=1, hb=60,
                                        host="pc-1", os="linux 6.1"), at)
    fleet.apply_report(report(kit, 1, entries, **kw), at)


def dev(state="ok", **kw) -> wire.DeviceEntry:
    return wire.DeviceEntry(s=state, **kw)


def text_of(fleet: Fleet) -> str:
    return b"".join(metrics.exposition(metrics.Exposition(fleet))).decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def of(kit: wire.KitId, **labels) -> tuple:
    return tuple(sorted({"kabupaten": kit.kabupaten, "kecamatan": kit.kecamatan, "kit": kit.kit, **labels}.items()))


FULL = wire.KitId("sintang", "dedai", "kit-1")
SILENT = wire.KitId("sintang", "ambalau", "kit-1")


def full_entries() -> dict:
    return {
        "fingerprint": dev(vendor="DigitalPersona, Inc.", serial="FP-1"),
        "iris": dev("missing", c="not_detected"),
        "camera": dev(),
        "signature_pad": dev("warn"),
        "card_reader": dev("error"),
        "ups": wire.UpsEntry(s="ok", on_batt=True, batt_low=False, charge=0.75, in_v=0.0, load=0.2),
        "link": wire.LinkEntry(s="ok", targets={"district": wire.LinkTarget(up=True, rtt=0.012, sent=5, recv=4)},
                               ifaces={"eth0": True}),
        "host": wire.HostEntry(s="warn", cpu=0.5, disks={"/": wire.Disk(1000, 2000), "C:\\": wire.Disk(7, 9)},
                               temps={"cpu": 41.5}, skew=-1.25),
    }


def test_every_family_of_a_full_kit():
    fleet = make_fleet(inventory={"sintang": {"kecamatan": {"ambalau": {"kits": ["kit-1"], "lat": -0.5, "lon": 112.0},
                                                            "dedai": {"kits": ["kit-1"]}}}})
    online(fleet, FULL, full_entries(), q=wire.QueueStats(3, 2, "full"))
    got = samples(text_of(fleet))
    k = FULL
    assert got[("ektp_kit_info", of(k, hostname="pc-1", agent_version="0.1.0", os="linux 6.1"))] == 1
    assert got[("ektp_kit_expected", of(k))] == 1
    assert got[("ektp_kit_online", of(k))] == 1
    assert got[("ektp_kit_ready", of(k))] == 0  # iris missing
    assert got[("ektp_kit_last_report_timestamp_seconds", of(k))] == pytest.approx(NOW, abs=0.001)
    assert got[("ektp_kit_reports_received_total", of(k))] == 1
    up = {d: got[("ektp_device_up", of(k, device=d))] for d in ("fingerprint", "iris", "camera", "signature_pad",
                                                                "card_reader", "ups")}
    assert up == {"fingerprint": 1, "iris": 0, "camera": 1, "signature_pad": 1, "card_reader": 0, "ups": 1}
    broken = {dict(labels)["device"] for (name, labels) in got if name == "ektp_device_state_change_timestamp_seconds"}
    assert broken == {"iris", "card_reader"}, "since when: only for devices that are down"
    assert got[("ektp_device_state_change_timestamp_seconds", of(k, device="iris"))] == pytest.approx(NOW, abs=0.001)
    assert got[("ektp_ups_on_battery", of(k))] == 1
    assert got[("ektp_ups_battery_low", of(k))] == 0
    assert got[("ektp_ups_battery_charge_ratio", of(k))] == 0.75
    assert got[("ektp_ups_input_voltage_volts", of(k))] == 0.0
    assert got[("ektp_link_up", of(k, target="district"))] == 1
    assert got[("ektp_link_rtt_seconds", of(k, target="district"))] == 0.012
    assert got[("ektp_link_probes_sent_total", of(k, target="district"))] == 5
    assert got[("ektp_link_probes_received_total", of(k, target="district"))] == 4
    assert got[("ektp_link_interface_up", of(k, interface="eth0"))] == 1
    assert got[("ektp_host_disk_free_bytes", of(k, mount="/"))] == 1000
    assert got[("ektp_host_disk_free_bytes", of(k, mount="C:\\"))] == 7
    assert got[("ektp_host_temperature_celsius", of(k, sensor="cpu"))] == 41.5
    assert got[("ektp_host_clock_skew_seconds", of(k))] == -1.25
    assert got[("ektp_agent_queued_reports", of(k))] == 3
    assert got[("ektp_agent_dropped_reports_total", of(k))] == 2
    assert got[("ektp_agent_queue_on_disk", of(k))] == 0
    # the expected kit that never reported: kit-level series only, required devices down
    s = SILENT
    assert got[("ektp_kit_online", of(s))] == 0 and got[("ektp_kit_expected", of(s))] == 1
    assert ("ektp_kit_last_report_timestamp_seconds", of(s)) not in got
    assert ("ektp_agent_queued_reports", of(s)) not in got
    assert {dict(labels)["device"] for (name, labels), v in got.items()
            if name == "ektp_device_up" and dict(labels)["kit"] == "kit-1" and dict(labels)["kecamatan"] == "ambalau"
            } == {"fingerprint", "iris", "camera", "signature_pad"}
    assert got[("ektp_kecamatan_location_info", (("kabupaten", "sintang"), ("kecamatan", "ambalau"),
                                                ("latitude", "-0.5"), ("longitude", "112.0"), ("name", "Ambalau")))] == 1
    assert got[("ektp_collector_kits", (("state", "not_ready"),))] == 1
    assert got[("ektp_collector_kits", (("state", "offline"),))] == 1
    assert got[("ektp_collector_kits", (("state", "ready"),))] == 0
    names = {name for name, _ in got}
    assert {f.name for f in metrics.FAMILIES} <= names <= metrics.metric_names(), "the full kit shows every family"


def test_second_probes_of_a_kind_give_no_duplicate_series():
    fleet = make_fleet(required=())
    link = wire.LinkEntry(s="ok", targets={"district": wire.LinkTarget(up=True), "dns": wire.LinkTarget(up=True)},
                          ifaces={"eth0": True})
    link2 = wire.LinkEntry(s="error", targets={"district": wire.LinkTarget(up=False), "kab": wire.LinkTarget(up=False)},
                           ifaces={"eth0": False, "wlan0": True})
    host = wire.HostEntry(s="ok", disks={"/": wire.Disk(1, 2)})
    host2 = wire.HostEntry(s="ok", disks={"/": wire.Disk(3, 4)}, skew=9.0)
    online(fleet, FULL, {"link": link, "link2": link2, "host": host, "host2": host2})
    got = samples(text_of(fleet))  # asserts no duplicate series
    targets = {dict(labels)["target"]: v for (name, labels), v in got.items() if name == "ektp_link_up"}
    assert targets == {"district": 1, "dns": 1, "kab": 0}, "the first probe's target of a name is the one shown"
    ifaces = {dict(labels)["interface"]: v for (name, labels), v in got.items() if name == "ektp_link_interface_up"}
    assert ifaces == {"eth0": 1, "wlan0": 1}
    assert got[("ektp_host_disk_free_bytes", of(FULL, mount="/"))] == 1, "one host per kit: the first"
    assert ("ektp_host_clock_skew_seconds", of(FULL)) not in got


ODD = 'a "quoted" back\\slash\nnew line'


def test_label_values_are_escaped_and_the_text_is_valid():
    fleet = make_fleet()
    fleet.apply_status(FULL, wire.Status(v=1, state="online", boot=BOOT, ts=NOW, agent="0.1.0", host=ODD, os=ODD),
                       NOW)
    fleet.apply_report(report(FULL, 1, {
        "link": wire.LinkEntry(s="ok", targets={ODD: wire.LinkTarget(up=True, rtt=1e-05, sent=2**60, recv=3)},
                               ifaces={ODD: False}),
        "host": wire.HostEntry(s="ok", disks={ODD: wire.Disk(0, 1)}, temps={ODD: -3.0}),
    }), NOW)
    text = text_of(fleet)
    got = samples(text)
    assert got[("ektp_link_up", of(FULL, target=ODD))] == 1
    assert got[("ektp_link_probes_sent_total", of(FULL, target=ODD))] == 2**60
    assert got[("ektp_link_rtt_seconds", of(FULL, target=ODD))] == 1e-05
    assert got[("ektp_link_interface_up", of(FULL, interface=ODD))] == 0
    assert got[("ektp_host_disk_free_bytes", of(FULL, mount=ODD))] == 0
    assert got[("ektp_host_temperature_celsius", of(FULL, sensor=ODD))] == -3.0
    assert got[("ektp_kit_info", of(FULL, hostname=ODD, agent_version="0.1.0", os=ODD))] == 1
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    done = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        (done.stdout + done.stderr).decode()


def test_a_kit_that_leaves_leaves_no_series_and_nothing_is_kept():
    fleet = make_fleet()
    kits = [wire.KitId("kab", f"kec-{i}", "kit-1") for i in range(3)]
    for kit in kits:
        online(fleet, kit, full_entries())
    exposition = metrics.Exposition(fleet)
    first = b"".join(exposition.render()).decode()
    assert 'kecamatan="kec-1"' in first
    with fleet.lock:
        del fleet.kits[kits[1]]
    second = b"".join(exposition.render()).decode()
    assert 'kecamatan="kec-1"' not in second
    assert samples(second)[("ektp_collector_kits", (("state", "not_ready"),))] == 2
    assert vars(exposition) == {"fleet": fleet}, "an Exposition keeps nothing between scrapes"


def test_values_follow_the_fleet_between_scrapes():
    fleet = make_fleet(required=("fingerprint",))
    online(fleet, FULL, {"fingerprint": dev("error")})
    exposition = metrics.Exposition(fleet)
    before = samples(b"".join(exposition.render()).decode())
    assert before[("ektp_device_up", of(FULL, device="fingerprint"))] == 0
    assert ("ektp_device_state_change_timestamp_seconds", of(FULL, device="fingerprint")) in before
    fleet.apply_report(report(FULL, 2, {"fingerprint": dev("ok")}), NOW + 5)
    after = samples(b"".join(exposition.render()).decode())
    assert after[("ektp_device_up", of(FULL, device="fingerprint"))] == 1
    assert after[("ektp_kit_ready", of(FULL))] == 1
    assert ("ektp_device_state_change_timestamp_seconds", of(FULL, device="fingerprint")) not in after
    assert after[("ektp_kit_reports_received_total", of(FULL))] == 2


def test_an_empty_fleet():
    got = samples(text_of(make_fleet()))
    assert {name for name, _ in got} == {"ektp_collector_kits"}


def test_large_families_come_in_chunks():
    fleet = make_fleet(required=())
    for i in range(metrics.BLOCK * 2 + 5):
        fleet.apply_status(wire.KitId("kab", f"kec-{i}", "kit-1"), wire.Status(v=1, state="offline", boot=BOOT), NOW)
    chunks = list(metrics.Exposition(fleet).render())
    assert max(map(len, chunks)) < 200_000, "no chunk needs a big allocation"
    got = samples(b"".join(chunks).decode())
    assert sum(1 for name, _ in got if name == "ektp_kit_online") == metrics.BLOCK * 2 + 5
