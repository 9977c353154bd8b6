"""The alert engine: conditions -> alerts with hold-downs and hysteresis -> queued notifications.

An alert goes pending when its condition becomes active, fires (one email) once the condition
has lasted its hold-down, stays firing while the condition flaps, and resolves (one email, with
the downtime) only after the condition has been gone for its recovery hold. Reminders repeat
while it stays firing. State and queued emails live in the collector's SQLite store and change
in one transaction, so a restart neither loses nor repeats an alert.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from agent import wire
from collector.alerts import conditions
from collector.config import AlertsConfig, HoldConfig
from collector.fleet import Fleet, Kit

log = logging.getLogger("ektp.collector.alerts")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    kabupaten TEXT NOT NULL, kecamatan TEXT NOT NULL, kit TEXT NOT NULL,
    condition TEXT NOT NULL, subject TEXT NOT NULL,
    state TEXT NOT NULL, severity TEXT NOT NULL, since REAL NOT NULL,
    fired_at REAL, last_notified REAL, ok_since REAL, facts TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (kabupaten, kecamatan, kit, condition, subject)
);
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY,
    recipient TEXT NOT NULL, created REAL NOT NULL, kind TEXT NOT NULL, condition TEXT NOT NULL,
    kabupaten TEXT NOT NULL, kecamatan TEXT NOT NULL, kit TEXT NOT NULL, subject TEXT NOT NULL,
    severity TEXT NOT NULL, context TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
    sent_at REAL, error TEXT NOT NULL DEFAULT '', message_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS notifications_queued ON notifications (status, recipient, next_attempt);
CREATE TABLE IF NOT EXISTS alert_meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""


@dataclass
class Alert:
    kit: wire.KitId
    condition: str
    subject: str
    state: str  # pending | firing | recovering
    severity: str
    since: float
    fired_at: float | None = None
    last_notified: float | None = None
    ok_since: float | None = None
    facts: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (*self.kit, self.condition, self.subject)


@dataclass
class Notification:
    recipient: str
    kind: str  # firing | escalated | reminder | resolved
    alert: Alert
    context: dict
    created: float


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 6371.0 * 2 * math.asin(math.sqrt(h))


class AlertStore:
    """Alerts and the email outbox, in the collector's SQLite file."""

    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def load(self) -> dict[tuple, Alert]:
        alerts = {}
        for row in self.db.execute("SELECT kabupaten, kecamatan, kit, condition, subject, state, severity, since,"
                                   " fired_at, last_notified, ok_since, facts FROM alerts"):
            alert = Alert(wire.KitId(*row[:3]), row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10],
                          json.loads(row[11]))
            alerts[alert.key] = alert
        return alerts

    def started(self, now: float) -> float:
        """When this store first ran alerting; survives restarts so `stale` is not delayed again."""
        self.db.execute("INSERT OR IGNORE INTO alert_meta VALUES ('started', ?)", (now,))
        return self.db.execute("SELECT value FROM alert_meta WHERE key='started'").fetchone()[0]

    def save(self, changed: list[Alert], removed: list[tuple], notifications: list[Notification]) -> None:
        db = self.db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET state=excluded.state,"
                " severity=excluded.severity, since=excluded.since, fired_at=excluded.fired_at,"
                " last_notified=excluded.last_notified, ok_since=excluded.ok_since, facts=excluded.facts",
                [(*a.kit, a.condition, a.subject, a.state, a.severity, a.since, a.fired_at, a.last_notified,
                  a.ok_since, json.dumps(a.facts)) for a in changed],
            )
            db.executemany("DELETE FROM alerts WHERE kabupaten=? AND kecamatan=? AND kit=? AND condition=?"
                           " AND subject=?", removed)
            db.executemany(
                "INSERT INTO notifications (recipient, created, kind, condition, kabupaten, kecamatan, kit, subject,"
                " severity, context, next_attempt) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(n.recipient, n.created, n.kind, n.alert.condition, *n.alert.kit, n.alert.subject, n.alert.severity,
                  json.dumps(n.context, ensure_ascii=False), n.created) for n in notifications],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- outbox ----------------------------------------------------------------------------

    def due(self, now: float) -> dict[str, list[dict]]:
        rows = self.db.execute(
            "SELECT id, recipient, created, kind, condition, kabupaten, kecamatan, kit, subject, severity, context,"
            " attempts, message_id FROM notifications WHERE status='queued' AND next_attempt <= ? ORDER BY id", (now,)
        ).fetchall()
        keys = ("id", "recipient", "created", "kind", "condition", "kabupaten", "kecamatan", "kit", "subject",
                "severity", "context", "attempts", "message_id")
        out: dict[str, list[dict]] = {}
        for row in rows:
            item = dict(zip(keys, row))
            item["context"] = json.loads(item["context"])
            out.setdefault(item["recipient"], []).append(item)
        return out

    def claim_message_id(self, ids: list[int], message_id: str) -> None:
        """Stored before sending, so a send repeated after a crash carries the same Message-ID
        and mail clients show it once."""
        self.db.executemany("UPDATE notifications SET message_id=? WHERE id=?", [(message_id, i) for i in ids])

    def mark_sent(self, ids: list[int], now: float) -> None:
        self.db.executemany("UPDATE notifications SET status='sent', sent_at=?, error='' WHERE id=?",
                            [(now, i) for i in ids])

    def mark_failed(self, ids: list[int], now: float, error: str, attempts: int) -> float:
        retry = now + min(3600.0, 30.0 * 2 ** min(attempts, 10))
        self.db.executemany("UPDATE notifications SET attempts=attempts+1, next_attempt=?, error=? WHERE id=?",
                            [(retry, error[:500], i) for i in ids])
        return retry

    def queued(self) -> int:
        return self.db.execute("SELECT count(*) FROM notifications WHERE status='queued'").fetchone()[0]

    def close(self) -> None:
        self.db.close()


class AlertEngine:
    def __init__(self, config: AlertsConfig, fleet: Fleet, store: AlertStore, now: float, deliver: bool = True):
        self.cfg = config
        self.deliver = deliver  # without SMTP, alerts keep their state but queue no email
        self.fleet = fleet
        self.store = store
        self.alerts = store.load()
        self.started = store.started(now)

    def recipients(self, kabupaten: str) -> list[str]:
        if not self.deliver:
            return []
        if self.cfg.test_address:
            return [self.cfg.test_address]
        people = list(self.cfg.recipients.everywhere) + list(self.cfg.recipients.kabupaten.get(kabupaten, []))
        return list(dict.fromkeys(people))

    def _settings(self, condition: str) -> HoldConfig:
        # stale waits inside its condition (time since the collector started), not again here
        return {"kit_down": self.cfg.kit_down, "power": self.cfg.power, "link": self.cfg.link,
                "stale": HoldConfig(0, 0)}[condition]

    def evaluate(self, now: float) -> list[Notification]:
        kits = self.fleet.snapshot()
        ready = [k for k in kits if k.ready]
        changed: dict[tuple, Alert] = {}
        removed: list[tuple] = []
        notes: list[Notification] = []
        args = {"required": self.fleet.required, "target": self.cfg.link.target, "started": self.started,
                "hold": self.cfg.stale.hold}
        for kit in kits:
            for name, check in conditions.CONDITIONS.items():
                subject = self.cfg.link.target if name == "link" else ""
                finding = check(kit, now, **args)
                key = (*kit.id, name, subject)
                alert = self.alerts.get(key)
                if finding.active is None:
                    continue
                kinds, alert = self._step(alert, kit, name, subject, finding, now, changed, removed)
                for kind in kinds:
                    context = self._context(kit, alert, kind, now, ready)
                    for recipient in self.recipients(kit.id.kabupaten):
                        notes.append(Notification(recipient, kind, alert, context, now))
        if changed or removed or notes:
            self.store.save(list(changed.values()), removed, notes)
        for note in notes:
            log.info("alert %s %s %s for %s", note.alert.condition, note.kind, note.alert.severity, note.alert.kit)
        return notes

    def _step(self, alert, kit: Kit, name, subject, finding, now, changed, removed) -> tuple[list[str], Alert]:
        """One alert's state machine; returns the notification kinds to send and the alert."""
        settings = self._settings(name)
        key = (*kit.id, name, subject)
        facts = finding.facts or {}
        if alert is None:
            if not finding.active:
                return [], alert
            since = min(finding.since, now) if finding.since else now
            alert = Alert(kit.id, name, subject, "pending", finding.severity, since, facts=facts)
            self.alerts[key] = changed[key] = alert
        if alert.state == "pending":
            if not finding.active:
                del self.alerts[key]
                changed.pop(key, None)
                removed.append(key)
                return [], alert
            alert.facts, alert.severity = facts, finding.severity
            if now - alert.since >= settings.hold:
                alert.state, alert.fired_at, alert.last_notified = "firing", now, now
                changed[key] = alert
                return ["firing"], alert
            changed[key] = alert
            return [], alert
        if finding.active:
            kinds = []
            escalated = alert.severity == "warning" and finding.severity == "critical"
            if alert.state == "recovering":
                alert.state, alert.ok_since = "firing", None  # flapping: still the same open alert
            alert.facts, alert.severity = facts, finding.severity if escalated else alert.severity
            repeat = self.cfg.stale.repeat if name == "stale" else self.cfg.reminder_every
            if escalated:
                kinds.append("escalated")
                alert.last_notified = now
            elif now - (alert.last_notified or alert.fired_at or now) >= repeat:
                kinds.append("reminder")
                alert.last_notified = now
            changed[key] = alert
            return kinds, alert
        if alert.state == "firing":
            alert.state, alert.ok_since = "recovering", now
            changed[key] = alert
            return [], alert
        if now - alert.ok_since >= getattr(settings, "recover", 0):
            del self.alerts[key]
            changed.pop(key, None)
            removed.append(key)
            alert.facts = {**alert.facts, "downtime": alert.ok_since - alert.since}
            return ["resolved"], alert
        return [], alert

    def _context(self, kit: Kit, alert: Alert, kind: str, now: float, ready: list[Kit]) -> dict:
        fleet = self.fleet
        kab, kec, kit_name = kit.id
        ups = kit.entries.get("ups")
        links = {t: s.up for e in kit.entries.values() if isinstance(e, wire.LinkEntry) for t, s in e.targets.items()}
        nearest = None
        here = fleet.coords.get((kab, kec))
        if here and alert.condition in ("kit_down", "stale"):
            best = None
            for other in ready:
                there = fleet.coords.get(other.id[:2])
                if there and other.id[:2] != (kab, kec):
                    candidate = (round(haversine_km(here, there), 3), other.id)  # ties: by name
                    if best is None or candidate < best:
                        best = candidate
            if best:
                nearest = {"kecamatan": fleet.display_name(best[1].kabupaten, best[1].kecamatan),
                           "kit": best[1].kit, "km": round(best[0], 1)}
        return {
            "kind": kind,
            "condition": alert.condition,
            "severity": alert.severity,
            "subject": alert.subject,
            "kabupaten": kab,
            "kecamatan": kec,
            "kit": kit_name,
            "kabupaten_name": fleet.display_name(kab),
            "kecamatan_name": fleet.display_name(kab, kec),
            "since": alert.since,
            "now": now,
            "facts": alert.facts,
            "online": kit.online,
            "last_report": kit.last_report,
            "ups": None if not isinstance(ups, wire.UpsEntry) else
            {"on_battery": ups.on_batt, "battery_low": ups.batt_low, "charge": ups.charge},
            "links": links,
            "nearest_ready": nearest,
        }
