"""Prometheus metrics: the metric contract, and its text exposition built from the fleet's state.

This file is the one place that names metrics: dashboards and alert rules depend on them. Each
family is a row of FAMILIES: a name, and where its values come from (a field of each kit, UPS,
host, disk or link target, or a function of its own). Nothing is a global Gauge and nothing is
kept between scrapes, so a kit that leaves the fleet leaves no stale series behind. The text is
written here rather than through prometheus_client's generic objects because a national fleet
(15,000 kits, about 375,000 samples) must render in well under a second on a small server; tests
check the output with prometheus_client's parser and `promtool check metrics`.

A scrape, at 15,000 kits:
1. `Table`, under the fleet's lock (about 0.2 s at 15,000 kits, while ingest waits): one pass over
   the kits reads everything the families show into columns (label text, values), with each
   kit's label text made once. No copy of a kit.
2. `_text`, per family: the family's lines are one join of its columns interleaved, in blocks of
   about 100 kB sent as they are made. Each distinct value is formatted once per scrape (most
   repeat across a fleet).
What /metrics carries is chosen for that size: docs/collector.md lists it, and what is left to
/api/fleet and why. Per sample the cost is about a microsecond; a family with one sample per kit
costs about 5 ms per scrape at 15,000 kits.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from itertools import compress
from operator import attrgetter, gt
from typing import Callable, Iterator, NamedTuple, Sequence

from agent import wire
from collector.config import DEVICE_NAMES
from collector.fleet import Fleet, Kit
from collector.rules import USABLE_STATES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KIT_STATES = ("ready", "not_ready", "offline")
BLOCK = 1024  # sample lines per chunk of text, about 100 kB


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Memo(dict):
    """Text made once per distinct key per scrape: `make(key)` on the first lookup."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[object], str], known: dict | None = None):
        super().__init__(known or {})
        self.make = make

    def __missing__(self, key) -> str:
        text = self[key] = self.make(key)
        return text


def _numbers() -> _Memo:
    """Sample values as text. repr() of a float costs about a microsecond, and most values repeat
    across a fleet (a charge of 1.0, 220.0 V, 0 reports queued). True, 1 and 1.0 are one key and one
    sample value; repr of a non-finite float ('inf', 'nan') is valid in the text format. None (no
    value, so no sample) is ''."""
    return _Memo(repr, {None: "", True: "1", False: "0"})


def _stamps() -> _Memo:
    """Unix times, to the millisecond: '%.3f' costs half of repr, and some repeat (the collector's
    time stamped on every device of one report)."""
    return _Memo("%.3f".__mod__, {None: ""})


# A family's samples: each line's label text, as a list of parts (a column with one item per
# sample, or a str that every sample shares) that together make '{...} ', and its values (None: no
# sample), in step.
Samples = tuple[list["Sequence[str] | str"], Sequence]


class Family(NamedTuple):
    name: str
    type: str  # gauge | counter
    help: str
    # A Table source ("kit", "reporting", "ups", "host", "disk", "target") and the field of its items
    # that is the value; or source "" and a function giving the family's samples.
    source: str
    value: str | Callable[["Table"], Samples]
    timestamp: bool = False  # values are Unix times, written to the millisecond


class Table:
    """What the families show of the fleet, read in one pass over the kits, under the fleet's lock
    (ingest replaces a kit's entries whole, but changes its counters and device_changed in place).

    Sources of one-field families: "kit" (every kit), "reporting" (kits that have reported), "ups",
    "host" (the UPS and host entry of each kit that has one), "disk", "target" (each disk of a host,
    each link target): `parts[source]` is their label text and `values[source][field]` a column
    per field in `_FIELDS[source]`. Families of their own read `labels` (each kit's
    '{kabupaten="..",kecamatan="..",kit=".."', no closing brace), `devices`, `broken`, `ifaces` and
    `temps`.

    A kit's entries are read while at hand: the kits are scattered in memory, and a pass per
    field would cost a cache miss per kit each time.
    """

    def __init__(self, kits: list[Kit], required: tuple[str, ...]):
        self.kits = len(kits)
        self.numbers, self.stamps = _numbers(), _stamps()
        columns = list(zip(*map(attrgetter("id", "entries", "device_changed", *_FIELDS["kit"]), kits))) or \
            [()] * (3 + len(_FIELDS["kit"]))
        ids, kit_entries, kit_changed = columns[:3]
        kit_values = dict(zip(_FIELDS["kit"], columns[3:]))
        # kit ids are slugs (topic levels, inventory keys): nothing to escape
        self.labels = labels = [f'{{kabupaten="{kab}",kecamatan="{kec}",kit="{name}"' for kab, kec, name in ids]
        heads = [label + "} " for label in labels]
        reported = [last is not None for last in kit_values["last_report"]]
        self.values: dict[str, dict[str, Sequence]] = {
            "kit": kit_values,
            "reporting": {field: list(compress(kit_values[field], reported)) for field in _FIELDS["reporting"]}}
        self.parts: dict[str, list] = {"kit": [heads], "reporting": [list(compress(heads, reported))]}

        # Devices with a series: reported, or required (then down when not reported), as labels
        # and up; for the devices down, since when (label, ',device=".."} ', time).
        self.devices: dict[str, tuple[list[str], list[bool]]] = {}
        device_columns = {}
        for device in DEVICE_NAMES:
            these = self.devices[device] = ([], [])
            device_columns[device] = (these[0].append, these[1].append, f',device="{device}"}} ')
        required = frozenset(required)
        # (labels, suffixes such as ',interface="eth0"} ', values) of the others
        self.broken, self.ifaces, self.temps = ([], [], []), ([], [], []), ([], [], [])
        ups_heads, ups_rows, host_heads, host_rows = [], [], [], []
        disk_labels, disk_suffixes, disk_rows = [], [], []
        target_labels, target_suffixes, target_rows = [], [], []
        self.parts.update(ups=[ups_heads], host=[host_heads], disk=[disk_labels, disk_suffixes],
                          target=[target_labels, target_suffixes])
        esc = _Memo(_esc)
        target_text = _Memo(lambda name: f',target="{esc[name]}"}} ')
        iface_text = _Memo(lambda name: f',interface="{esc[name]}"}} ')
        mount_text = _Memo(lambda name: f',mount="{esc[name]}"}} ')
        sensor_text = _Memo(lambda name: f',sensor="{esc[name]}"}} ')
        # of each UPS, host, disk and link target: a row of the fields its families show
        ups_of, host_of, disk_of, target_of = map(_getter, (_FIELDS["ups"], _FIELDS["host"], _FIELDS["disk"],
                                                            _FIELDS["target"]))
        broken_label, broken_suffix, broken = (column.append for column in self.broken)
        add_ups_head, add_ups, add_host_head, add_host = (ups_heads.append, ups_rows.append, host_heads.append,
                                                          host_rows.append)
        disk_label, disk_suffix, disk = disk_labels.append, disk_suffixes.append, disk_rows.append
        target_label, target_suffix, target = target_labels.append, target_suffixes.append, target_rows.append
        UpsEntry, HostEntry, LinkEntry = wire.UpsEntry, wire.HostEntry, wire.LinkEntry

        for entries, changed, label, head in zip(kit_entries, kit_changed, labels, heads):
            host = link = None
            for name, entry in entries.items():
                device = device_columns.get(name)
                if device is not None:
                    add_label, add_up, suffix = device
                    add_label(label)
                    if entry.s in USABLE_STATES:
                        add_up(True)
                    else:
                        add_up(False)
                        if (since := changed.get(name)) is not None:
                            broken_label(label)
                            broken_suffix(suffix)
                            broken(since)
                    if name == "ups" and type(entry) is UpsEntry:
                        add_ups_head(head)
                        add_ups(ups_of(entry))
                    continue
                # One host per kit, each link target and interface once: a second probe of the
                # same kind would otherwise give duplicate series and fail the whole scrape.
                kind = type(entry)
                if kind is HostEntry:
                    if host is None:
                        host = entry
                        add_host_head(head)
                        add_host(host_of(entry))
                        for mount, item in entry.disks.items():
                            disk_label(label)
                            disk_suffix(mount_text[mount])
                            disk(disk_of(item))
                        for sensor, celsius in entry.temps.items():
                            _add(self.temps, label, sensor_text[sensor], celsius)
                elif kind is LinkEntry:
                    if link is None:  # the kit's first link probe: all of its targets
                        link, seen = entry, None
                        for key, state in entry.targets.items():
                            target_label(label)
                            target_suffix(target_text[key])
                            target(target_of(state))
                        for key, up in entry.ifaces.items():
                            _add(self.ifaces, label, iface_text[key], up)
                        continue
                    if seen is None:
                        seen = set(link.targets), set(link.ifaces)
                    for key, state in entry.targets.items():
                        if key not in seen[0]:
                            seen[0].add(key)
                            target_label(label)
                            target_suffix(target_text[key])
                            target(target_of(state))
                    for key, up in entry.ifaces.items():
                        if key not in seen[1]:
                            seen[1].add(key)
                            _add(self.ifaces, label, iface_text[key], up)
            if required and not entries.keys() >= required:
                for name in required:  # required and not reported: down
                    if name not in entries:
                        add_label, add_up, _ = device_columns[name]
                        add_label(label)
                        add_up(False)

        for source, rows in (("ups", ups_rows), ("host", host_rows), ("disk", disk_rows), ("target", target_rows)):
            self.values[source] = _columns(_FIELDS[source], rows)


def _add(columns: tuple[list, list, list], label: str, suffix: str, value) -> None:
    columns[0].append(label)
    columns[1].append(suffix)
    columns[2].append(value)


def _getter(fields: tuple[str, ...]) -> Callable:
    return attrgetter(*fields) if fields else lambda item: None


def _columns(fields: tuple[str, ...], rows: list) -> dict[str, Sequence]:
    """Rows of _getter(fields) values as a column per field."""
    if len(fields) == 1:  # attrgetter of one field gives the value itself
        return {fields[0]: rows}
    return dict(zip(fields, zip(*rows) if rows else [()] * len(fields)))


def _text(family: Family, samples: Samples, table: Table) -> Iterator[bytes]:
    """The family's HELP, TYPE and sample lines, in chunks of BLOCK lines.

    A chunk is one join of the label parts and values interleaved. Chunks stay small on purpose:
    text made in memory the allocator already holds costs a copy, while one big string (tens of MB
    for a large fleet) costs a page fault per 4 kB, which on a small VM is most of the time."""
    parts, values = samples
    texts = list(map((table.stamps if family.timestamp else table.numbers).__getitem__, values))
    if "" in texts:  # no value, no sample ('' is much quicker to look for than None among numbers)
        parts = [part if isinstance(part, str) else list(compress(part, texts)) for part in parts]
        texts = list(filter(None, texts))
    if not texts:
        return
    name = family.name
    step = len(parts) + 2  # newline and name, the label parts, the value
    separator = "\n" + name
    for start in range(0, len(texts), BLOCK):
        block = texts[start:start + BLOCK]
        size = len(block)
        pieces = [separator] * (step * size)
        for i, part in enumerate(parts, 1):
            pieces[i::step] = [part] * size if isinstance(part, str) else part[start:start + BLOCK]
        pieces[step - 1::step] = block
        pieces[0] = f"# HELP {name} {family.help}\n# TYPE {name} {family.type}\n{name}" if start == 0 else name
        pieces.append("\n")
        yield "".join(pieces).encode()


def _samples(family: Family, table: Table) -> Samples:
    if family.source:
        return table.parts[family.source], table.values[family.source][family.value]
    return family.value(table)


def _kit_info(t: Table) -> Samples:
    esc = _Memo(_esc)
    text = _Memo(lambda key: f',hostname="{esc[key[0]]}",agent_version="{esc[key[1]]}",os="{esc[key[2]]}"}} ')
    kit = t.values["kit"]  # kits mostly share these: each text made once
    return [t.labels, list(map(text.__getitem__, zip(kit["host"], kit["agent_version"], kit["os"])))], [1] * t.kits


def _device_up(t: Table) -> Samples:
    labels, suffixes, up = [], [], []
    for device, (these, values) in t.devices.items():
        labels += these
        suffixes += [f',device="{device}"}} '] * len(these)
        up += values
    return [labels, suffixes], up


def _other(name: str) -> Callable[[Table], Samples]:
    """Samples of the Table's (labels, suffixes, values) `name`."""
    return lambda t: (list(getattr(t, name)[:2]), getattr(t, name)[2])


G, C = "gauge", "counter"
FAMILIES: tuple[Family, ...] = (
    Family("ektp_kit_info", G, "Kit metadata from its agent's status message (value 1).", "", _kit_info),
    Family("ektp_kit_expected", G, "1 if the kit is in the collector's inventory, 0 if it appeared on its own.",
           "kit", "expected"),
    Family("ektp_kit_online", G, "1 while the kit's status is online and its reports arrive in time.", "kit", "online"),
    Family("ektp_kit_ready", G, "1 when the kit is online and every required device is up: it can record.",
           "kit", "ready"),
    Family("ektp_kit_last_report_timestamp_seconds", G, "When the collector last received a report.",
           "kit", "last_report", timestamp=True),
    Family("ektp_kit_ready_change_timestamp_seconds", G, "When ektp_kit_ready last changed value.",
           "kit", "ready_changed", timestamp=True),
    Family("ektp_kit_reports_received_total", C, "Reports received from the kit (duplicates excluded).",
           "kit", "reports"),
    Family("ektp_device_up", G, "1 if the device is present and working (ok or warn), 0 otherwise.", "", _device_up),
    Family("ektp_device_state_change_timestamp_seconds", G, "While the device is not up: when its state last "
           "changed, so since when it is broken.", "", _other("broken"), timestamp=True),
    Family("ektp_ups_on_battery", G, "1 while the UPS runs on battery (mains failed).", "ups", "on_batt"),
    Family("ektp_ups_battery_low", G, "1 while the UPS reports a low battery.", "ups", "batt_low"),
    Family("ektp_ups_battery_charge_ratio", G, "Battery charge 0..1 (estimated from voltage on Megatec).",
           "ups", "charge"),
    Family("ektp_ups_input_voltage_volts", G, "Mains input voltage.", "ups", "in_v"),
    Family("ektp_link_up", G, "1 if the target answered in the last link check.", "target", "up"),
    Family("ektp_link_rtt_seconds", G, "Round trip of the last answered link check.", "target", "rtt"),
    Family("ektp_link_probes_sent_total", C, "Link checks sent to the target since the agent started.",
           "target", "sent"),
    Family("ektp_link_probes_received_total", C, "Link checks answered since the agent started.", "target", "recv"),
    Family("ektp_link_interface_up", G, "1 if the network interface is up.", "", _other("ifaces")),
    Family("ektp_host_disk_free_bytes", G, "Disk space free.", "disk", "free"),
    Family("ektp_host_temperature_celsius", G, "Temperature sensors of the PC.", "", _other("temps")),
    Family("ektp_host_clock_skew_seconds", G, "Seconds the PC clock is ahead of the reference server.",
           "host", "skew"),
    Family("ektp_agent_queued_reports", G, "Reports waiting in the agent's store-and-forward queue.",
           "reporting", "queued"),
    Family("ektp_agent_dropped_reports_total", C, "Reports the agent dropped because its queue was full.",
           "reporting", "dropped"),
    Family("ektp_agent_queue_on_disk", G, "1 while the agent's queue is on disk; 0 while the disk refuses "
           "writes (full, read-only) and reports are held in memory only.", "",
           lambda t: (t.parts["reporting"], [not problem for problem in t.values["reporting"]["queue_problem"]])),
)


def _fields(sources: tuple[str, ...], *more: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys([family.value for family in FAMILIES if family.source in sources] + list(more)))


# The fields the Table reads: of the kits, those FAMILIES show and those read above (kit info, queue
# problem; online and ready for ektp_collector_kits), and of them those kept for kits that have
# reported; of each UPS, host, disk and link target, those FAMILIES show.
_FIELDS: dict[str, tuple[str, ...]] = {
    "kit": _fields(("kit", "reporting"), "last_report", "host", "agent_version", "os", "queue_problem", "online",
                   "ready"),
    "reporting": _fields(("reporting",), "queue_problem"),
    **{source: _fields((source,)) for source in ("ups", "host", "disk", "target")},
}


@contextmanager
def _gc_paused():
    """Cyclic GC off while the Table is read: its tens of thousands of new tuples would otherwise
    set off collections over the whole fleet, which find nothing."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class Exposition:
    """Renders the fleet's families from one Table per scrape, streamed in chunks.

    Nothing is kept between scrapes: at 15,000 kits every kit usually changed since the last one
    (a report per heartbeat), and the rendered text (tens of MB) would cost far more memory than
    rendering it again costs time."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def render(self) -> Iterator[bytes]:
        fleet = self.fleet
        with _gc_paused(), fleet.lock:  # readers read under the lock (collector/fleet.py)
            table = Table(list(fleet.kits.values()), fleet.required)
        for family in FAMILIES:
            yield from _text(family, _samples(family, table), table)
        places = sorted(fleet.coords.items())
        if places:  # only what the inventory gives; coordinates are never guessed
            yield (_header("ektp_kecamatan_location_info", G, "Kecamatan position from the collector's inventory "
                           "(value 1), for map panels.")
                   + "".join(f'ektp_kecamatan_location_info{{kabupaten="{kab}",kecamatan="{kec}",'
                             f'name="{_esc(fleet.display_name(kab, kec))}",latitude="{lat}",longitude="{lon}"}} 1\n'
                             for (kab, kec), (lat, lon) in places)).encode()
        online, ready = table.values["kit"]["online"], table.values["kit"]["ready"]
        counts = {"ready": sum(ready), "not_ready": sum(map(gt, online, ready))}  # online and not ready
        counts["offline"] = table.kits - counts["ready"] - counts["not_ready"]
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
