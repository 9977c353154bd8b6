"""The alert conditions in one place: what counts as "kit down", "on battery", "link lost", "stale".

Each condition looks at one kit and answers: active or not (or unknown, when the kit cannot
tell right now), how severe, since when, and the facts an email needs. The engine adds the
hold-downs, hysteresis and reminders.
"""

from __future__ import annotations

from typing import NamedTuple

from agent import wire
from collector import rules
from collector.fleet import Kit


class Finding(NamedTuple):
    active: bool | None  # None: unknown right now, keep the alert as it is
    severity: str = "warning"  # warning | critical
    since: float | None = None  # when the condition began, if the fleet knows
    facts: dict | None = None


def kit_down(kit: Kit, now: float, required: tuple[str, ...], **_) -> Finding:
    """Not ready: offline, or a required device missing or faulty."""
    if kit.last_report is None:
        return Finding(False)  # never reported: that is the `stale` condition
    if kit.ready:
        return Finding(False)
    devices = []
    if kit.online:
        for name in rules.missing_required(kit.entries, required):
            entry = kit.entries.get(name)
            devices.append({"name": name, "state": entry.s if entry else "absent",
                            "code": entry.c if entry else "not_reported", "detail": entry.m if entry else ""})
    return Finding(True, "critical", kit.ready_changed, {"offline": not kit.online, "devices": devices})


def power(kit: Kit, now: float, **_) -> Finding:
    """The UPS runs on battery (warning); the battery is low (critical)."""
    ups = kit.entries.get("ups")
    if not isinstance(ups, wire.UpsEntry) or ups.on_batt is None:
        return Finding(None if kit.last_report is not None else False)
    if not ups.on_batt and not ups.batt_low:
        return Finding(False)
    return Finding(True, "critical" if ups.batt_low else "warning", None,
                   {"battery_low": bool(ups.batt_low), "charge": ups.charge, "load": ups.load})


def link(kit: Kit, now: float, target: str = "district", **_) -> Finding:
    """No answer from the configured district target."""
    if not kit.online:
        return Finding(None)  # an offline kit tells nothing about its link; kit_down covers it
    for entry in kit.entries.values():
        if isinstance(entry, wire.LinkEntry) and target in entry.targets:
            state = entry.targets[target]
            return Finding(not state.up, "warning", None,
                           {"target": target, "sent": state.sent, "received": state.recv})
    return Finding(False)


def stale(kit: Kit, now: float, started: float, hold: int, **_) -> Finding:
    """An expected kit that has never reported, once the collector has waited long enough."""
    active = kit.expected and kit.last_report is None and now - started >= hold
    return Finding(active, "warning", None, {})


CONDITIONS = {"kit_down": kit_down, "power": power, "link": link, "stale": stale}
