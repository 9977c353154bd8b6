"""Prometheus metrics: a custom collector that builds every family from a fleet snapshot.

This file is the metric contract: dashboards and alert rules depend on these names. Nothing is
a global Gauge, so a kit that leaves the fleet leaves no stale series behind.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import wire
from collector import rules
from collector.config import DEVICE_NAMES
from collector.fleet import Fleet

KIT = ["kabupaten", "kecamatan", "kit"]
KIT_STATES = ("ready", "not_ready", "offline")


def _g(name, doc, extra=()):
    return GaugeMetricFamily(name, doc, labels=KIT + list(extra))


def _c(name, doc, extra=()):
    return CounterMetricFamily(name, doc, labels=KIT + list(extra))


class FleetCollector(Collector):
    def __init__(self, fleet: Fleet, ingest=None, alerts=None):
        self.fleet = fleet
        self.ingest = ingest
        self.alerts = alerts  # (AlertEngine, Mailer) or None

    def describe(self) -> list[Metric]:
        return []  # families depend on the fleet; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        required = self.fleet.required
        kit_info = _g("ektp_kit_info", "Kit metadata from its agent's status message (value 1).",
                      ["hostname", "agent_version", "os"])
        expected = _g("ektp_kit_expected", "1 if the kit is in the collector's inventory, 0 if it appeared on its own.")
        online = _g("ektp_kit_online", "1 while the kit's status is online and its reports arrive in time.")
        status_online = _g("ektp_kit_status_online", "1 while the kit's retained MQTT status says online.")
        ready = _g("ektp_kit_ready", "1 when the kit is online and every required device is up: it can record.")
        last_report = _g("ektp_kit_last_report_timestamp_seconds", "When the collector last received a report.")
        ready_change = _g("ektp_kit_ready_change_timestamp_seconds", "When ektp_kit_ready last changed value.")
        online_change = _g("ektp_kit_online_change_timestamp_seconds", "When ektp_kit_online last changed value.")
        heartbeat = _g("ektp_kit_heartbeat_seconds", "The agent's heartbeat: a report is due at least this often.")
        reports = _c("ektp_kit_reports_received", "Reports received from the kit (duplicates excluded).")
        replayed = _c("ektp_kit_reports_replayed", "Reports received from the kit's backlog after an outage.")
        duplicates = _c("ektp_kit_reports_duplicate", "Reports received twice and dropped.")
        dev_up = _g("ektp_device_up", "1 if the device is present and working (ok or warn), 0 otherwise.", ["device"])
        dev_info = _g("ektp_device_info", "Identity of the unit present (value 1).",
                      ["device", "vendor", "product", "serial"])
        dev_change = _g("ektp_device_state_change_timestamp_seconds", "When the device's state last changed.",
                        ["device"])
        ups = {
            "on_batt": _g("ektp_ups_on_battery", "1 while the UPS runs on battery (mains failed)."),
            "batt_low": _g("ektp_ups_battery_low", "1 while the UPS reports a low battery."),
            "charge": _g("ektp_ups_battery_charge_ratio", "Battery charge 0..1 (estimated from voltage on Megatec)."),
            "load": _g("ektp_ups_load_ratio", "Load as a ratio of the UPS's rating."),
            "in_v": _g("ektp_ups_input_voltage_volts", "Mains input voltage."),
            "out_v": _g("ektp_ups_output_voltage_volts", "Output voltage."),
            "batt_v": _g("ektp_ups_battery_voltage_volts", "Battery voltage."),
            "in_hz": _g("ektp_ups_input_frequency_hertz", "Mains input frequency."),
            "temp": _g("ektp_ups_temperature_celsius", "UPS temperature."),
        }
        link_up = _g("ektp_link_up", "1 if the target answered in the last link check.", ["target"])
        link_rtt = _g("ektp_link_rtt_seconds", "Round trip of the last answered link check.", ["target"])
        link_sent = _c("ektp_link_probes_sent", "Link checks sent to the target since the agent started.",
                       ["target"])
        link_recv = _c("ektp_link_probes_received", "Link checks answered since the agent started.", ["target"])
        iface_up = _g("ektp_link_interface_up", "1 if the network interface is up.", ["interface"])
        cpu = _g("ektp_host_cpu_usage_ratio", "CPU busy ratio over the last host check.")
        mem_avail = _g("ektp_host_memory_available_bytes", "Memory available.")
        mem_size = _g("ektp_host_memory_size_bytes", "Memory installed.")
        disk_free = _g("ektp_host_disk_free_bytes", "Disk space free.", ["mount"])
        disk_size = _g("ektp_host_disk_size_bytes", "Disk size.", ["mount"])
        temp = _g("ektp_host_temperature_celsius", "Temperature sensors of the PC.", ["sensor"])
        boot_time = _g("ektp_host_boot_time_seconds", "When the PC booted.")
        skew = _g("ektp_host_clock_skew_seconds", "Seconds the PC clock is ahead of the reference server.")
        queued = _g("ektp_agent_queued_reports", "Reports waiting in the agent's store-and-forward queue.")
        dropped = _c("ektp_agent_dropped_reports", "Reports the agent dropped because its queue was full.")
        queue_on_disk = _g("ektp_agent_queue_on_disk", "1 while the agent's queue is on disk; 0 while the disk "
                           "refuses writes (full, read-only) and reports are held in memory only.")
        probe_up = _g("ektp_probe_success", "1 if the agent's probe ran and found nothing failing.", ["probe"])

        counts = dict.fromkeys(KIT_STATES, 0)
        for kit in self.fleet.snapshot():
            base = list(kit.id)
            counts["ready" if kit.ready else "not_ready" if kit.online else "offline"] += 1
            kit_info.add_metric(base + [kit.host, kit.agent_version, kit.os], 1)
            expected.add_metric(base, int(kit.expected))
            online.add_metric(base, int(kit.online))
            status_online.add_metric(base, int(kit.status == "online"))
            ready.add_metric(base, int(kit.ready))
            if kit.last_report is not None:
                last_report.add_metric(base, kit.last_report)
            if kit.ready_changed is not None:
                ready_change.add_metric(base, kit.ready_changed)
            if kit.online_changed is not None:
                online_change.add_metric(base, kit.online_changed)
            if kit.hb:
                heartbeat.add_metric(base, kit.hb)
            reports.add_metric(base, kit.reports)
            replayed.add_metric(base, kit.replayed)
            duplicates.add_metric(base, kit.duplicates)
            entries = kit.entries
            for device in DEVICE_NAMES:
                entry = entries.get(device)
                if entry is None and device not in required:
                    continue  # not configured on this kit: genuinely unknown
                dev_up.add_metric(base + [device], int(rules.device_up(entry)))
                if device in kit.device_changed:
                    dev_change.add_metric(base + [device], kit.device_changed[device])
                if isinstance(entry, wire.DeviceEntry) and (entry.vendor or entry.product or entry.serial or entry.vid):
                    vendor = entry.vendor or (entry.vid or "")
                    product = entry.product or (entry.pid or "")
                    dev_info.add_metric(base + [device, vendor, product, entry.serial or ""], 1)
                elif isinstance(entry, wire.UpsEntry) and (entry.vendor or entry.model):
                    dev_info.add_metric(base + [device, entry.vendor or "", entry.model or "", ""], 1)
            if kit.last_report is not None:
                queued.add_metric(base, kit.queued)
                dropped.add_metric(base, kit.dropped)
                queue_on_disk.add_metric(base, int(not kit.queue_problem))
            # One UPS and one host per kit, and each target once: a second probe of the same kind
            # would otherwise give duplicate series and fail the whole scrape.
            seen_kinds: set[type] = set()
            seen_targets: set[str] = set()
            seen_ifaces: set[str] = set()
            for name, entry in entries.items():
                probe_up.add_metric(base + [name], int(entry.s not in wire.FAILING_STATES))
                if isinstance(entry, (wire.UpsEntry, wire.HostEntry)):
                    if type(entry) in seen_kinds or (isinstance(entry, wire.UpsEntry) and name != "ups"):
                        continue
                    seen_kinds.add(type(entry))
                if isinstance(entry, wire.UpsEntry):
                    for key, family in ups.items():
                        value = getattr(entry, key)
                        if value is not None:
                            family.add_metric(base, float(value))
                elif isinstance(entry, wire.LinkEntry):
                    for target, t in entry.targets.items():
                        if target in seen_targets:
                            continue
                        seen_targets.add(target)
                        labels = base + [target]
                        link_up.add_metric(labels, int(t.up))
                        if t.rtt is not None:
                            link_rtt.add_metric(labels, t.rtt)
                        link_sent.add_metric(labels, t.sent)
                        link_recv.add_metric(labels, t.recv)
                    for iface, up in entry.ifaces.items():
                        if iface not in seen_ifaces:
                            seen_ifaces.add(iface)
                            iface_up.add_metric(base + [iface], int(up))
                elif isinstance(entry, wire.HostEntry):
                    if entry.cpu is not None:
                        cpu.add_metric(base, entry.cpu)
                    if entry.mem_avail is not None:
                        mem_avail.add_metric(base, entry.mem_avail)
                    if entry.mem_total is not None:
                        mem_size.add_metric(base, entry.mem_total)
                    for mount, disk in entry.disks.items():
                        disk_free.add_metric(base + [mount], disk.free)
                        disk_size.add_metric(base + [mount], disk.size)
                    for sensor, celsius in entry.temps.items():
                        temp.add_metric(base + [sensor], celsius)
                    if entry.boot is not None:
                        boot_time.add_metric(base, entry.boot)
                    if entry.skew is not None:
                        skew.add_metric(base, entry.skew)

        yield from (kit_info, expected, online, status_online, ready, last_report, ready_change, online_change,
                    heartbeat, reports, replayed, duplicates, dev_up, dev_info, dev_change, *ups.values(),
                    link_up, link_rtt, link_sent, link_recv, iface_up, cpu, mem_avail, mem_size, disk_free,
                    disk_size, temp, boot_time, skew, queued, dropped, queue_on_disk, probe_up)

        kits = GaugeMetricFamily("ektp_collector_kits", "Kits by state: ready, not_ready (online), offline.",
                                 labels=["state"])
        for state in KIT_STATES:
            kits.add_metric([state], counts[state])
        yield kits
        if self.ingest is not None:
            yield from self._collector_metrics()
        if self.alerts is not None:
            yield from self._alert_metrics()

    def _alert_metrics(self) -> Iterator[Metric]:
        engine, mailer = self.alerts
        open_alerts = GaugeMetricFamily("ektp_collector_alerts", "Alerts of the built-in engine by condition and state.",
                                        labels=["condition", "state"])
        counts = {(c, s): 0 for c in ("kit_down", "power", "link", "stale") for s in ("pending", "firing", "recovering")}
        for alert in list(engine.alerts.values()):
            counts[(alert.condition, alert.state)] = counts.get((alert.condition, alert.state), 0) + 1
        for (condition, state), count in sorted(counts.items()):
            open_alerts.add_metric([condition, state], count)
        yield open_alerts
        yield CounterMetricFamily("ektp_collector_emails_sent", "Alert emails sent.", value=mailer.sent)
        yield CounterMetricFamily("ektp_collector_email_failures", "Failed attempts to send an alert email.",
                                  value=mailer.failures)
        yield GaugeMetricFamily("ektp_collector_email_queued", "Notifications waiting in the email outbox.",
                                value=mailer.queued)

    def _collector_metrics(self) -> Iterator[Metric]:
        ingest = self.ingest
        yield CounterMetricFamily("ektp_collector_messages_received", "MQTT messages received from kits.",
                                  value=ingest.received)
        refused = CounterMetricFamily("ektp_collector_messages_refused", "Messages refused, by reason.",
                                      labels=["reason"])
        for reason, count in sorted(ingest.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily("ektp_collector_mqtt_connected", "1 while connected to the broker.",
                                value=int(ingest.connected.is_set()))
        yield GaugeMetricFamily("ektp_collector_inbox_messages", "Messages received and waiting to be processed.",
                                value=ingest.inbox.qsize())
