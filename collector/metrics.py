"""Prometheus metrics: the metric contract, and its text exposition built from a fleet snapshot.

This file is the one place that names metrics: dashboards and alert rules depend on them. Each
family is a row of FAMILIES with a function that gives one kit's sample lines. Nothing is a
global Gauge, so a kit that leaves the fleet leaves no stale series behind. The text is written
here rather than through prometheus_client's generic objects because a national fleet (15,000
kits, about 750,000 samples) must render in well under a second; tests check the output with
prometheus_client's parser and `promtool check metrics`.
"""

from __future__ import annotations

import gc
import threading
from typing import Callable, Iterator, NamedTuple

from agent import wire
from collector import rules
from collector.config import DEVICE_NAMES
from collector.fleet import Fleet, Kit

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KIT_STATES = ("ready", "not_ready", "offline")


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_BOOL = {True: "1", False: "0"}


def _num(value: float | int | bool) -> str:
    # Wire values are finite (JSON has no NaN or Infinity), so repr is valid Prometheus text.
    if value is True or value is False:
        return _BOOL[value]
    return repr(value)


class View:
    """What the families need of one kit, worked out once per change of the kit."""

    __slots__ = ("kit", "labels", "devices", "ups", "host", "targets", "ifaces")

    def __init__(self, kit: Kit, labels: str, required: tuple[str, ...]):
        self.kit = kit
        self.labels = labels
        self.ups = self.host = None
        self.targets: dict[str, wire.LinkTarget] = {}
        self.ifaces: dict[str, bool] = {}
        entries = kit.entries
        # One UPS and one host per kit, each target and interface once: a second probe of the
        # same kind would otherwise give duplicate series and fail the whole scrape.
        ups = entries.get("ups")
        if isinstance(ups, wire.UpsEntry):
            self.ups = ups
        for entry in entries.values():
            if isinstance(entry, wire.HostEntry) and self.host is None:
                self.host = entry
            elif isinstance(entry, wire.LinkEntry):
                for target, state in entry.targets.items():
                    self.targets.setdefault(target, state)
                for iface, up in entry.ifaces.items():
                    self.ifaces.setdefault(iface, up)
        # devices with a series: reported, or required (then 0 when not reported)
        self.devices = [(d, entries.get(d)) for d in DEVICE_NAMES if d in entries or d in required]


class Family(NamedTuple):
    name: str
    type: str  # gauge | counter
    help: str
    # one kit's sample lines, each ending in a newline; `head` is 'name{kit labels' (no brace)
    lines: Callable[[View, str], str]


def one(value: Callable[[View], float | int | bool | None]) -> Callable[[View, str], str]:
    """A family with one sample per kit (none when the value is unknown)."""

    def lines(v: View, head: str) -> str:
        x = value(v)
        return "" if x is None else head + "} " + _num(x) + "\n"

    return lines


def per(label: str, items: Callable[[View], Iterator[tuple[str, float | int | bool | None]]],
        escape: bool = False) -> Callable[[View, str], str]:
    """A family with one sample per device, target, mount, ... of a kit."""

    def lines(v: View, head: str) -> str:
        return "".join(f'{head},{label}="{_esc(k) if escape else k}"}} {_num(x)}\n'
                       for k, x in items(v) if x is not None)

    return lines


def _ups(field: str) -> Callable[[View], float | None]:
    return lambda v: None if v.ups is None else getattr(v.ups, field)


def _host(field: str) -> Callable[[View], float | None]:
    return lambda v: None if v.host is None else getattr(v.host, field)


def _agent(field: str) -> Callable[[View], int | None]:
    return lambda v: None if v.kit.last_report is None else getattr(v.kit, field)


def _kit_info(v: View, head: str) -> str:
    k = v.kit
    return f'{head},hostname="{_esc(k.host)}",agent_version="{_esc(k.agent_version)}",os="{_esc(k.os)}"}} 1\n'


def _device_info(v: View, head: str) -> str:
    out = []
    for device, entry in v.devices:
        if isinstance(entry, wire.DeviceEntry) and (entry.vendor or entry.product or entry.serial or entry.vid):
            vendor, product, serial = entry.vendor or entry.vid or "", entry.product or entry.pid or "", entry.serial or ""
        elif isinstance(entry, wire.UpsEntry) and (entry.vendor or entry.model):
            vendor, product, serial = entry.vendor or "", entry.model or "", ""
        else:
            continue
        out.append(f'{head},device="{device}",vendor="{_esc(vendor)}",product="{_esc(product)}",'
                   f'serial="{_esc(serial)}"}} 1\n')
    return "".join(out)


def _disks(field: str):
    return lambda v: ((m, getattr(d, field)) for m, d in v.host.disks.items()) if v.host else ()


G, C = "gauge", "counter"
FAMILIES: tuple[Family, ...] = (
    Family("ektp_kit_info", G, "Kit metadata from its agent's status message (value 1).", _kit_info),
    Family("ektp_kit_expected", G, "1 if the kit is in the collector's inventory, 0 if it appeared on its own.",
           one(lambda v: v.kit.expected)),
    Family("ektp_kit_online", G, "1 while the kit's status is online and its reports arrive in time.",
           one(lambda v: v.kit.online)),
    Family("ektp_kit_status_online", G, "1 while the kit's retained MQTT status says online.",
           one(lambda v: v.kit.status == "online")),
    Family("ektp_kit_ready", G, "1 when the kit is online and every required device is up: it can record.",
           one(lambda v: v.kit.ready)),
    Family("ektp_kit_last_report_timestamp_seconds", G, "When the collector last received a report.",
           one(lambda v: v.kit.last_report)),
    Family("ektp_kit_ready_change_timestamp_seconds", G, "When ektp_kit_ready last changed value.",
           one(lambda v: v.kit.ready_changed)),
    Family("ektp_kit_online_change_timestamp_seconds", G, "When ektp_kit_online last changed value.",
           one(lambda v: v.kit.online_changed)),
    Family("ektp_kit_heartbeat_seconds", G, "The agent's heartbeat: a report is due at least this often.",
           one(lambda v: v.kit.hb)),
    Family("ektp_kit_reports_received_total", C, "Reports received from the kit (duplicates excluded).",
           one(lambda v: v.kit.reports)),
    Family("ektp_kit_reports_replayed_total", C, "Reports received from the kit's backlog after an outage.",
           one(lambda v: v.kit.replayed)),
    Family("ektp_kit_reports_duplicate_total", C, "Reports received twice and dropped.",
           one(lambda v: v.kit.duplicates)),
    Family("ektp_device_up", G, "1 if the device is present and working (ok or warn), 0 otherwise.",
           per("device", lambda v: ((d, rules.device_up(e)) for d, e in v.devices))),
    Family("ektp_device_info", G, "Identity of the unit present (value 1).", _device_info),
    Family("ektp_device_state_change_timestamp_seconds", G, "When the device's state last changed.",
           per("device", lambda v: ((d, v.kit.device_changed.get(d)) for d, _ in v.devices))),
    Family("ektp_ups_on_battery", G, "1 while the UPS runs on battery (mains failed).", one(_ups("on_batt"))),
    Family("ektp_ups_battery_low", G, "1 while the UPS reports a low battery.", one(_ups("batt_low"))),
    Family("ektp_ups_battery_charge_ratio", G, "Battery charge 0..1 (estimated from voltage on Megatec).",
           one(_ups("charge"))),
    Family("ektp_ups_load_ratio", G, "Load as a ratio of the UPS's rating.", one(_ups("load"))),
    Family("ektp_ups_input_voltage_volts", G, "Mains input voltage.", one(_ups("in_v"))),
    Family("ektp_ups_output_voltage_volts", G, "Output voltage.", one(_ups("out_v"))),
    Family("ektp_ups_battery_voltage_volts", G, "Battery voltage.", one(_ups("batt_v"))),
    Family("ektp_ups_input_frequency_hertz", G, "Mains input frequency.", one(_ups("in_hz"))),
    Family("ektp_ups_temperature_celsius", G, "UPS temperature.", one(_ups("temp"))),
    Family("ektp_link_up", G, "1 if the target answered in the last link check.",
           per("target", lambda v: ((t, s.up) for t, s in v.targets.items()))),
    Family("ektp_link_rtt_seconds", G, "Round trip of the last answered link check.",
           per("target", lambda v: ((t, s.rtt) for t, s in v.targets.items()))),
    Family("ektp_link_probes_sent_total", C, "Link checks sent to the target since the agent started.",
           per("target", lambda v: ((t, s.sent) for t, s in v.targets.items()))),
    Family("ektp_link_probes_received_total", C, "Link checks answered since the agent started.",
           per("target", lambda v: ((t, s.recv) for t, s in v.targets.items()))),
    Family("ektp_link_interface_up", G, "1 if the network interface is up.",
           per("interface", lambda v: v.ifaces.items(), escape=True)),
    Family("ektp_host_cpu_usage_ratio", G, "CPU busy ratio over the last host check.", one(_host("cpu"))),
    Family("ektp_host_memory_available_bytes", G, "Memory available.", one(_host("mem_avail"))),
    Family("ektp_host_memory_size_bytes", G, "Memory installed.", one(_host("mem_total"))),
    Family("ektp_host_disk_free_bytes", G, "Disk space free.", per("mount", _disks("free"), escape=True)),
    Family("ektp_host_disk_size_bytes", G, "Disk size.", per("mount", _disks("size"), escape=True)),
    Family("ektp_host_temperature_celsius", G, "Temperature sensors of the PC.",
           per("sensor", lambda v: v.host.temps.items() if v.host else (), escape=True)),
    Family("ektp_host_boot_time_seconds", G, "When the PC booted.", one(_host("boot"))),
    Family("ektp_host_clock_skew_seconds", G, "Seconds the PC clock is ahead of the reference server.",
           one(_host("skew"))),
    Family("ektp_agent_queued_reports", G, "Reports waiting in the agent's store-and-forward queue.",
           one(_agent("queued"))),
    Family("ektp_agent_dropped_reports_total", C, "Reports the agent dropped because its queue was full.",
           one(_agent("dropped"))),
    Family("ektp_agent_queue_on_disk", G, "1 while the agent's queue is on disk; 0 while the disk refuses "
           "writes (full, read-only) and reports are held in memory only.",
           one(lambda v: None if v.kit.last_report is None else not v.kit.queue_problem)),
    Family("ektp_probe_success", G, "1 if the agent's probe ran and found nothing failing.",
           per("probe", lambda v: ((n, e.s not in wire.FAILING_STATES) for n, e in v.kit.entries.items()))),
)


def _fingerprint(kit: Kit) -> tuple:
    """Changes whenever anything a family shows of the kit changes (entries are replaced whole)."""
    return (kit.last_report, kit.status, kit.online, kit.ready, kit.online_changed, kit.ready_changed,
            kit.reports, kit.replayed, kit.duplicates, kit.queued, kit.dropped, kit.queue_problem, kit.hb,
            kit.host, kit.agent_version, kit.os, kit.expected)


class _Cached:
    __slots__ = ("heads", "entries", "fingerprint", "chunks")


class Exposition:
    """Renders the fleet's families, re-rendering only kits that changed since the last scrape:
    at 15,000 kits a full render costs seconds, a scrape of mostly unchanged kits milliseconds."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self._cache: dict[wire.KitId, _Cached] = {}
        self._lock = threading.Lock()

    def _chunks(self, kit: Kit) -> list[str]:
        cached = self._cache.get(kit.id)
        fingerprint = _fingerprint(kit)
        if cached is not None and cached.entries is kit.entries and cached.fingerprint == fingerprint:
            return cached.chunks
        if cached is None:
            cached = _Cached()
            kab, kec, name = kit.id
            labels = f'kabupaten="{kab}",kecamatan="{kec}",kit="{name}"'  # slugs: nothing to escape
            cached.heads = [f"{family.name}{{{labels}" for family in FAMILIES]
            self._cache[kit.id] = cached
        view = View(kit, "", self.fleet.required)
        cached.chunks = [family.lines(view, head) for family, head in zip(FAMILIES, cached.heads)]
        cached.entries, cached.fingerprint = kit.entries, fingerprint
        return cached.chunks

    def render(self) -> Iterator[bytes]:
        """One chunk per family, streamed, so no 100 MB string is ever built."""
        kits = self.fleet.snapshot()
        with self._lock:  # two scrapes at once share the cache
            collecting = gc.isenabled()
            gc.disable()  # hundreds of thousands of short strings: cyclic GC passes find nothing
            try:
                rows = [self._chunks(kit) for kit in kits]
            finally:
                if collecting:
                    gc.enable()
            if len(self._cache) > len(kits):  # kits gone from the fleet leave no series behind
                present = {kit.id for kit in kits}
                for kit_id in [k for k in self._cache if k not in present]:
                    del self._cache[kit_id]
        for index, family in enumerate(FAMILIES):
            body = "".join([row[index] for row in rows])
            if body:
                yield (_header(family.name, family.type, family.help) + body).encode()
        places = sorted(self.fleet.coords.items())
        if places:  # only what the inventory gives; coordinates are never guessed
            yield (_header("ektp_kecamatan_location_info", G, "Kecamatan position from the collector's inventory "
                           "(value 1), for map panels.")
                   + "".join(f'ektp_kecamatan_location_info{{kabupaten="{kab}",kecamatan="{kec}",'
                             f'name="{_esc(self.fleet.display_name(kab, kec))}",latitude="{lat}",longitude="{lon}"}} 1\n'
                             for (kab, kec), (lat, lon) in places)).encode()
        counts = dict.fromkeys(KIT_STATES, 0)
        for kit in kits:
            counts["ready" if kit.ready else "not_ready" if kit.online else "offline"] += 1
        yield (_header("ektp_collector_kits", G, "Kits by state: ready, not_ready (online), offline.")
               + "".join(f'ektp_collector_kits{{state="{s}"}} {counts[s]}\n' for s in KIT_STATES)).encode()


def _header(name: str, kind: str, doc: str) -> str:
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"  # text format 0.0.4: counters keep _total


COLLECTOR_FAMILIES = (
    "ektp_kecamatan_location_info", "ektp_collector_kits", "ektp_collector_messages_received_total", "ektp_collector_messages_refused_total",
    "ektp_collector_mqtt_connected", "ektp_collector_inbox_messages", "ektp_collector_alerts",
    "ektp_collector_emails_sent_total", "ektp_collector_email_failures_total", "ektp_collector_email_queued",
)


def metric_names() -> set[str]:
    """Every metric name this collector can expose."""
    return {family.name for family in FAMILIES} | set(COLLECTOR_FAMILIES)


def collector_exposition(ingest, alerts) -> Iterator[bytes]:
    """The collector's own health: ingest counters, broker connection, alerting and email."""
    out = []
    if ingest is not None:
        out.append(_header("ektp_collector_messages_received_total", "counter", "MQTT messages received from kits.")
                   + f"ektp_collector_messages_received_total {ingest.received}\n")
        out.append(_header("ektp_collector_messages_refused_total", "counter", "Messages refused, by reason.")
                   + "".join(f'ektp_collector_messages_refused_total{{reason="{r}"}} {n}\n'
                             for r, n in sorted(ingest.refused.items())))
        out.append(_header("ektp_collector_mqtt_connected", "gauge", "1 while connected to the broker.")
                   + f"ektp_collector_mqtt_connected {int(ingest.connected.is_set())}\n")
        out.append(_header("ektp_collector_inbox_messages", "gauge", "Messages received and waiting to be processed.")
                   + f"ektp_collector_inbox_messages {ingest.inbox.qsize()}\n")
    if alerts is not None:
        engine, mailer = alerts
        counts = {(c, s): 0 for c in ("kit_down", "power", "link", "stale") for s in ("pending", "firing", "recovering")}
        for alert in list(engine.alerts.values()):
            counts[(alert.condition, alert.state)] = counts.get((alert.condition, alert.state), 0) + 1
        out.append(_header("ektp_collector_alerts", "gauge", "Alerts of the built-in engine by condition and state.")
                   + "".join(f'ektp_collector_alerts{{condition="{c}",state="{s}"}} {n}\n'
                             for (c, s), n in sorted(counts.items())))
        out.append(_header("ektp_collector_emails_sent_total", "counter", "Alert emails sent.")
                   + f"ektp_collector_emails_sent_total {mailer.sent}\n")
        out.append(_header("ektp_collector_email_failures_total", "counter", "Failed attempts to send an alert email.")
                   + f"ektp_collector_email_failures_total {mailer.failures}\n")
        out.append(_header("ektp_collector_email_queued", "gauge", "Notifications waiting in the email outbox.")
                   + f"ektp_collector_email_queued {mailer.queued}\n")
    yield "".join(out).encode()


def exposition(fleet: Exposition, ingest=None, alerts=None) -> Iterator[bytes]:
    yield from fleet.render()
    yield from collector_exposition(ingest, alerts)
