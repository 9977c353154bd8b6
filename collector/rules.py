"""The fleet's rules in one place: when a kit is online, when it is ready, when a device is up.

Everything the metrics, the API and the alerts say about "online" and "ready" comes from here.
Liveness is judged by the collector's own receive time, never the kit's clock, so a PC whose
clock jumps by hours is judged correctly.
"""

from __future__ import annotations

from agent import wire

DEFAULT_HEARTBEAT = 60
# States in which a device still lets the kit record (warn: e.g. a unit lent from elsewhere).
USABLE_STATES = frozenset({"ok", "warn"})


def report_timeout(heartbeat: int | None, offline_after_heartbeats: float) -> float:
    """Seconds without a report after which a kit counts as offline."""
    return (heartbeat or DEFAULT_HEARTBEAT) * offline_after_heartbeats


def is_online(status: str | None, last_report: float | None, heartbeat: int | None, now: float,
              offline_after_heartbeats: float) -> bool:
    """Online while its retained status says online and its last report is recent enough.

    The second half catches a dead broker or a lost Last Will: the status alone may say online
    for ever.
    """
    if status != "online" or last_report is None:
        return False
    return now - last_report <= report_timeout(heartbeat, offline_after_heartbeats)


def device_up(entry: wire.Entry | None) -> bool:
    return entry is not None and entry.s in USABLE_STATES


def is_ready(online: bool, entries: dict[str, wire.Entry], required: tuple[str, ...]) -> bool:
    """Ready to record: online and every required device present and usable."""
    return online and all(device_up(entries.get(name)) for name in required)


def missing_required(entries: dict[str, wire.Entry], required: tuple[str, ...]) -> list[str]:
    """The required devices that keep a kit from recording, in the configured order."""
    return [name for name in required if not device_up(entries.get(name))]
