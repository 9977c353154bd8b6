"""Fleet state: every kit's current state, derived online/ready, and the changes as events.

Owned by the ingest worker thread; readers (metrics, API) take a snapshot under the lock.
A report becomes the kit's current state only if it is newer than what the kit shows now:
same boot and higher sequence, or the first report of a new boot that is not a replay.
Older reports (a backlog replayed after an outage, a killed agent's queue sent by its
successor) only add to history, stamped with their agent time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from operator import attrgetter
from sys import intern

import msgspec

from agent import wire
from collector import rules
from collector.config import DEVICE_NAMES, CollectorConfig

MAX_BOOTS_KEPT = 8  # per kit, for duplicate detection across agent restarts


class Event(msgspec.Struct, frozen=True):
    """One change, as stored in history. `at` is collector time; `agent_ts` the kit's clock."""

    kit: wire.KitId
    kind: str  # status, online, ready, device, probe, power, battery, link, identity
    subject: str  # device or target name, or "" for the kit itself
    old: str
    new: str
    at: float
    agent_ts: float | None = None
    replayed: bool = False
    detail: str = ""


class Ledger:
    """Which sequence numbers of one boot have arrived, as merged [first, last] ranges."""

    __slots__ = ("ranges",)

    def __init__(self, ranges: list[list[int]] | None = None):
        self.ranges: list[list[int]] = ranges or []

    def add(self, seq: int) -> bool:
        """Records `seq`; False if it was already there (a duplicate)."""
        ranges = self.ranges
        lo, hi = 0, len(ranges)
        while lo < hi:  # first range whose end is >= seq - 1
            mid = (lo + hi) // 2
            if ranges[mid][1] < seq - 1:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(ranges):
            first, last = ranges[lo]
            if first <= seq <= last:
                return False
            if seq == last + 1:
                ranges[lo][1] = seq
                if lo + 1 < len(ranges) and ranges[lo + 1][0] == seq + 1:
                    ranges[lo][1] = ranges[lo + 1][1]
                    del ranges[lo + 1]
                return True
            if seq == first - 1:
                ranges[lo][0] = seq
                return True
        ranges.insert(lo, [seq, seq])
        return True

    def count(self) -> int:
        return sum(last - first + 1 for first, last in self.ranges)

    def gaps(self) -> list[tuple[int, int]]:
        return [(a[1] + 1, b[0] - 1) for a, b in zip(self.ranges, self.ranges[1:])]


@dataclass(slots=True)  # no per-kit __dict__: about 1.3 kB less per kit
class Kit:
    id: wire.KitId
    expected: bool = False
    # from the retained status
    status: str | None = None
    status_boot: str | None = None
    status_reason: str = ""
    agent_version: str = ""
    host: str = ""
    os: str = ""
    connects: int = 0
    # from the newest report
    boot: str | None = None
    seq: int = 0
    hb: int | None = None
    entries: dict[str, wire.Entry] = field(default_factory=dict)
    last_report: float | None = None  # collector time of the last report of any kind
    last_report_ts: float | None = None  # agent time of the current report
    queued: int = 0
    dropped: int = 0
    queue_problem: str = ""
    # derived
    online: bool = False
    ready: bool = False
    online_changed: float | None = None
    ready_changed: float | None = None
    device_changed: dict[str, float] = field(default_factory=dict)
    # bookkeeping
    reports: int = 0
    replayed: int = 0
    duplicates: int = 0
    ledgers: dict[str, Ledger] = field(default_factory=dict)
    # identities that entries may refer to (idref) besides the current entries': per probe,
    # (boot, seq of the report that carried it in full, that entry). idents: one the current
    # entry no longer shows (the device went missing); replay_idents: the newest of a backlog.
    idents: dict[str, tuple[str, int, wire.Entry]] = field(default_factory=dict)
    replay_idents: dict[str, tuple[str, int, wire.Entry]] = field(default_factory=dict)
    replay_prev: dict[str, dict[str, wire.Entry]] = field(default_factory=dict)
    dirty: bool = True


class KitRecord(msgspec.Struct):
    """What is persisted of a kit so a restarted collector starts where it stopped."""

    status: str | None = None
    status_boot: str | None = None
    status_reason: str = ""
    agent_version: str = ""
    host: str = ""
    os: str = ""
    connects: int = 0
    boot: str | None = None
    seq: int = 0
    hb: int | None = None
    entries: dict[str, wire.AnyEntry] = {}
    last_report: float | None = None
    last_report_ts: float | None = None
    queued: int = 0
    dropped: int = 0
    queue_problem: str = ""
    online: bool = False
    ready: bool = False
    online_changed: float | None = None
    ready_changed: float | None = None
    device_changed: dict[str, float] = {}
    reports: int = 0
    replayed: int = 0
    duplicates: int = 0
    idents: list[tuple[str, str, int, wire.AnyEntry]] = []
    replay_idents: list[tuple[str, str, int, wire.AnyEntry]] = []


_RECORD_FIELDS = tuple(KitRecord.__struct_fields__)


def to_record(kit: Kit) -> KitRecord:
    values = {name: getattr(kit, name) for name in _RECORD_FIELDS}
    values["idents"] = [(name, *kept) for name, kept in kit.idents.items()]
    values["replay_idents"] = [(name, *kept) for name, kept in kit.replay_idents.items()]
    return KitRecord(**values)


class Refused(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Fleet:
    def __init__(self, config: CollectorConfig):
        self.cfg = config.fleet
        self.required = tuple(config.fleet.required_devices)
        self.lock = threading.Lock()
        self.kits: dict[wire.KitId, Kit] = {}
        self._seen: list[tuple[wire.KitId, str, int]] = []  # reports taken since take_seen()
        self.names: dict[tuple, str] = {}  # (kab,) / (kab, kec) -> display name
        self.coords: dict[tuple[str, str], tuple[float, float]] = {}
        for kab, kab_cfg in config.inventory.items():
            if kab_cfg.name:
                self.names[(kab,)] = kab_cfg.name
            for kec, kec_cfg in kab_cfg.kecamatan.items():
                if kec_cfg.name:
                    self.names[(kab, kec)] = kec_cfg.name
                if kec_cfg.lat is not None and kec_cfg.lon is not None:
                    self.coords[(kab, kec)] = (kec_cfg.lat, kec_cfg.lon)
                for kit in kec_cfg.kits:
                    kit_id = wire.KitId(kab, kec, kit)
                    self.kits[kit_id] = Kit(kit_id, expected=True)

    # -- lookups ---------------------------------------------------------------------------

    def _kit(self, kit_id: wire.KitId, now: float) -> Kit:
        kit = self.kits.get(kit_id)
        if kit is not None:
            return kit
        if self.cfg.unknown_kits == "refuse":
            raise Refused("unknown_kit", str(kit_id))
        if len(self.kits) >= self.cfg.max_kits:
            raise Refused("capacity", f"already {len(self.kits)} kits (fleet.max_kits)")
        kit = Kit(kit_id)
        self.kits[kit_id] = kit
        return kit

    def restore(self, kit_id: wire.KitId, record: KitRecord, ledgers: dict[str, Ledger]) -> None:
        kit = self.kits.get(kit_id)
        if kit is None:
            if self.cfg.unknown_kits == "refuse" or len(self.kits) >= self.cfg.max_kits:
                return
            kit = self.kits[kit_id] = Kit(kit_id)
        for name in _RECORD_FIELDS:
            setattr(kit, name, getattr(record, name))
        kit.entries = _shared({}, record.entries)
        kit.idents = {name: (boot, seq, entry) for name, boot, seq, entry in record.idents}
        kit.replay_idents = {name: (boot, seq, entry) for name, boot, seq, entry in record.replay_idents}
        kit.device_changed = dict(record.device_changed)
        kit.ledgers = ledgers
        kit.dirty = False

    # -- ingest ----------------------------------------------------------------------------

    def apply_status(self, kit_id: wire.KitId, status: wire.Status, now: float) -> list[Event]:
        with self.lock:
            kit = self._kit(kit_id, now)
            events: list[Event] = []
            if status.state == "offline" and kit.status == "online" and kit.status_boot not in (None, status.boot):
                return events  # a late Last Will of an earlier run; the kit is back already
            if status.state != kit.status:
                events.append(Event(kit_id, "status", "", kit.status or "unknown", status.state, now,
                                    status.ts or None, detail=status.reason))
            kit.status = status.state
            kit.status_boot = status.boot
            kit.status_reason = status.reason
            if status.state == "online":
                kit.agent_version, kit.host, kit.os = status.agent, status.host, status.os
                kit.connects = status.connects
                if status.hb:
                    kit.hb = status.hb
            kit.dirty = True
            events += self._derive(kit, now)
            return events

    def apply_report(self, report: wire.Report, now: float) -> list[Event]:
        kit_id = report.kit_id
        if report.ts > now + self.cfg.max_report_future or report.ts < now - self.cfg.max_report_age:
            raise Refused("clock", f"report time {report.ts:.0f} is too far from the collector's {now:.0f}")
        with self.lock:
            kit = self._kit(kit_id, now)
            ledger = kit.ledgers.get(report.boot)
            new_boot = ledger is None
            if new_boot:
                ledger = kit.ledgers[report.boot] = Ledger()
                if len(kit.ledgers) > MAX_BOOTS_KEPT:
                    oldest = next(iter(kit.ledgers))
                    del kit.ledgers[oldest]
                    kit.replay_prev.pop(oldest, None)
            if not ledger.add(report.seq):
                kit.duplicates += 1
                return []
            self._seen.append((kit_id, report.boot, report.seq))
            kit.reports += 1
            kit.last_report = now
            kit.dirty = True
            if report.replay:
                kit.replayed += 1
            if report.boot == kit.boot:
                current = report.seq > kit.seq
            else:
                current = kit.boot is None or (new_boot and not report.replay)
            if report.p:
                report = self._identities(kit, report, current)
            if current:
                if report.boot == kit.boot and report.seq > kit.seq + 1 and report.boot not in kit.replay_prev:
                    # a gap: the backlog that fills it is compared with the state before the gap
                    kit.replay_prev[report.boot] = kit.entries
                events = self._changes(kit_id, kit.entries, report.p, now, report.ts, report.replay)
                for event in events:
                    if event.kind in ("device", "probe"):
                        kit.device_changed[event.subject] = now
                entries = _shared(kit.entries, report.p)
                _keep_identities(kit, entries)
                kit.boot, kit.seq, kit.hb = report.boot, report.seq, report.hb
                kit.entries = entries
                kit.last_report_ts = report.ts
                if report.q is not None:
                    kit.queued, kit.dropped, kit.queue_problem = report.q.queued, report.q.dropped, report.q.problem
            else:
                previous = kit.replay_prev.get(report.boot)
                events = self._changes(kit_id, previous, report.p, now, report.ts, True) if previous else []
                kit.replay_prev[report.boot] = report.p
            events += self._derive(kit, now)
            return events

    @staticmethod
    def _identities(kit: Kit, report: wire.Report, current: bool) -> wire.Report:
        """Fills in identities left out by reference (idref).

        The agent refers to the newest identity it sent in full for that probe. In the live
        stream that is the kit's current entry (sent in full, or itself filled in from it), or
        the one kept when the device went missing (`_keep_identities`); in a backlog, the newest
        one the backlog carried. A reference to a report not (yet) received leaves the identity
        out: it is filled in when that report arrives, or by the agent's next full one. An
        identity is never guessed from another report.
        """
        resolved = None
        for name, entry in report.p.items():
            fields = wire.IDENTITY_FIELDS.get(type(entry))
            if fields is None:
                continue
            if entry.idref is None:
                if not current and _has_identity(entry, fields):
                    kept = kit.replay_idents.get(name)
                    if kept is None or kept[0] != report.boot or kept[1] < report.seq:
                        kit.replay_idents[name] = (report.boot, report.seq, entry)
                    # the kit's current entry may have been waiting for this one
                    now_shown = kit.entries.get(name)
                    if now_shown is not None and kit.boot == report.boot and now_shown.idref == report.seq \
                            and type(now_shown) is type(entry) and not _has_identity(now_shown, fields):
                        kit.entries = {**kit.entries, name: _with_identity(now_shown, entry, fields)}
                        kit.idents.pop(name, None)
                continue
            source = _identity_source(kit, name, report.boot, entry, fields)
            if source is not None:
                if resolved is None:
                    resolved = dict(report.p)
                resolved[name] = _with_identity(entry, source, fields)
        return report if resolved is None else msgspec.structs.replace(report, p=resolved)

    def sweep(self, now: float) -> list[Event]:
        """Re-derives online/ready for every kit: a silent kit goes offline here."""
        events: list[Event] = []
        with self.lock:
            for kit in self.kits.values():
                if kit.online or kit.online_changed is None:
                    events += self._derive(kit, now)
        return events

    # -- derivation ------------------------------------------------------------------------

    def _derive(self, kit: Kit, now: float) -> list[Event]:
        events = []
        online = rules.is_online(kit.status, kit.last_report, kit.hb, now, self.cfg.offline_after_heartbeats)
        ready = rules.is_ready(online, kit.entries, self.required)
        if online != kit.online or kit.online_changed is None:
            if kit.online_changed is not None or online:
                events.append(Event(kit.id, "online", "", _word(kit.online, "online", "offline"),
                                    _word(online, "online", "offline"), now))
            kit.online, kit.online_changed, kit.dirty = online, now, True
        if ready != kit.ready or kit.ready_changed is None:
            missing = ",".join(rules.missing_required(kit.entries, self.required)) if not ready else ""
            if kit.ready_changed is not None or ready:
                events.append(Event(kit.id, "ready", "", _word(kit.ready, "ready", "not_ready"),
                                    _word(ready, "ready", "not_ready"), now,
                                    detail=missing if online else "offline"))
            kit.ready, kit.ready_changed, kit.dirty = ready, now, True
        return events

    @staticmethod
    def _changes(kit_id, old: dict[str, wire.Entry], new: dict[str, wire.Entry], now: float,
                 agent_ts: float, replayed: bool) -> list[Event]:
        events: list[Event] = []
        # structs compare by value: most entries repeat unchanged and need no closer look
        changed = [name for name, after in new.items() if old.get(name) != after]
        changed += [name for name in old if name not in new]
        if not changed:
            return events

        def add(kind, subject, before, after, detail=""):
            events.append(Event(kit_id, kind, subject, before, after, now, agent_ts, replayed, detail))

        for name in sorted(changed):
            before, after = old.get(name), new.get(name)
            old_state = before.s if before is not None else "absent"
            new_state = after.s if after is not None else "absent"
            if old_state != new_state:
                kind = "device" if name in DEVICE_NAMES else "probe"
                add(kind, name, old_state, new_state, (after.c if after is not None else ""))
            if isinstance(after, wire.DeviceEntry) and isinstance(before, wire.DeviceEntry):
                if before.serial and after.serial and before.serial != after.serial:
                    add("identity", name, before.serial, after.serial)
            if isinstance(after, wire.UpsEntry):
                was = before if isinstance(before, wire.UpsEntry) else None
                if after.on_batt is not None and (was is None or was.on_batt != after.on_batt) and \
                        (was is not None or after.on_batt):
                    add("power", name, _word(was and was.on_batt, "battery", "mains") if was else "unknown",
                        _word(after.on_batt, "battery", "mains"))
                if after.batt_low is not None and (was is None or was.batt_low != after.batt_low) and \
                        (was is not None or after.batt_low):
                    add("battery", name, _word(was and was.batt_low, "low", "ok") if was else "unknown",
                        _word(after.batt_low, "low", "ok"))
            if isinstance(after, wire.LinkEntry):
                was_targets = before.targets if isinstance(before, wire.LinkEntry) else {}
                for target, state in after.targets.items():
                    previous = was_targets.get(target)
                    if previous is None and state.up:
                        continue
                    if previous is None or previous.up != state.up:
                        add("link", target, _word(previous.up, "up", "down") if previous else "unknown",
                            _word(state.up, "up", "down"))
        return events

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self) -> list[Kit]:
        """Shallow copies of every kit. Entries are immutable, so copies are cheap and safe."""
        with self.lock:
            return [_copy(kit) for kit in self.kits.values()]

    def get(self, kit_id: wire.KitId) -> Kit | None:
        with self.lock:
            kit = self.kits.get(kit_id)
            return _copy(kit) if kit else None

    def take_seen(self) -> list[tuple[wire.KitId, str, int]]:
        """(kit, boot, seq) of every report taken into a ledger since the last call."""
        with self.lock:
            seen, self._seen = self._seen, []
            return seen

    def take_dirty(self, only: set[wire.KitId] | None = None) -> list[tuple[wire.KitId, KitRecord]]:
        """Records of the kits changed since they were last taken (of `only`, when given)."""
        with self.lock:
            out = []
            kits = self.kits.values() if only is None else filter(None, map(self.kits.get, only))
            for kit in kits:
                if kit.dirty:
                    kit.dirty = False
                    out.append((kit.id, to_record(kit)))
            return out

    def display_name(self, kab: str, kec: str | None = None) -> str:
        key = (kab,) if kec is None else (kab, kec)
        return self.names.get(key) or (kec or kab).replace("-", " ").title()


_kit_values = attrgetter(*(f.name for f in dataclass_fields(Kit)))


def _copy(kit: Kit) -> Kit:
    clone = Kit(*_kit_values(kit))
    clone.device_changed = dict(kit.device_changed)
    return clone


def _text_fields(kind: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A struct's text fields worth sharing, and its fields that are dicts keyed by text."""
    text, keyed = [], []
    for f in msgspec.inspect.type_info(kind).fields:
        types = f.type.types if isinstance(f.type, msgspec.inspect.UnionType) else (f.type,)
        if any(isinstance(t, msgspec.inspect.StrType) for t in types) and f.name not in ("serial", "m"):
            text.append(f.name)  # not a unit's serial nor free text: those do not repeat
        elif any(isinstance(t, msgspec.inspect.DictType) for t in types):
            keyed.append(f.name)
    return tuple(text), tuple(keyed)


_TEXT = {kind: _text_fields(kind) for kind in wire.ENTRY_TYPES.values()}


def _shared(old: dict[str, wire.Entry], new: dict[str, wire.Entry]) -> dict[str, wire.Entry]:
    """A report's entries as the kit keeps them: an entry equal to the kit's previous one is that
    one, and text that repeats across the fleet (probe, target and mount names, USB ids, vendors,
    models, reason codes) is held once (sys.intern), not once per kit: about a third of a national
    fleet's memory."""
    out = {}
    for name, entry in new.items():
        before = old.get(name)
        if before is not None and before == entry:
            out[intern(name)] = before
            continue
        _share_text(entry)
        out[intern(name)] = entry
    return out


def _share_text(item) -> None:
    text, keyed = _TEXT[type(item)]
    for f in text:
        value = getattr(item, f)
        if value:
            setattr(item, f, intern(value))
    for f in keyed:
        mapping = getattr(item, f)
        if mapping:  # keyed by target, interface, mount or sensor names; the values hold no text
            setattr(item, f, {intern(key): value for key, value in mapping.items()})


def _has_identity(entry: wire.Entry, fields: tuple[str, ...]) -> bool:
    return any(getattr(entry, f) is not None for f in fields)


def _source_seq(kit: Kit, entry: wire.Entry) -> int:
    """The report whose identity a current entry shows: its own, or the one it referred to."""
    return kit.seq if entry.idref is None else entry.idref


def _identity_source(kit: Kit, name: str, boot: str, entry: wire.Entry,
                     fields: tuple[str, ...]) -> wire.Entry | None:
    """The entry that carried in full the identity `entry` refers to, if the kit has it."""
    shown = kit.entries.get(name)
    if shown is not None and kit.boot == boot and type(shown) is type(entry) and _has_identity(shown, fields) \
            and _source_seq(kit, shown) == entry.idref:
        return shown
    for held in (kit.idents, kit.replay_idents):
        kept = held.get(name)
        if kept is not None and kept[0] == boot and kept[1] == entry.idref and type(kept[2]) is type(entry):
            return kept[2]
    return None


def _keep_identities(kit: Kit, entries: dict[str, wire.Entry]) -> None:
    """Before the kit's current entries are replaced: an identity shown now that the new ones no
    longer show (the device went missing) is kept, since the agent refers to it again when the
    same unit comes back; one shown again needs keeping no longer."""
    for name, before in kit.entries.items():
        after = entries.get(name)
        if after is before:
            continue
        fields = wire.IDENTITY_FIELDS.get(type(before))
        if fields is None or not _has_identity(before, fields):
            continue
        if after is None or type(after) is not type(before) or not _has_identity(after, fields):
            kit.idents[name] = (kit.boot, _source_seq(kit, before), before)
    for name in [name for name in kit.idents if name in entries and
                 _has_identity(entries[name], wire.IDENTITY_FIELDS.get(type(entries[name]), ()))]:
        del kit.idents[name]


def _with_identity(entry: wire.Entry, source: wire.Entry, fields: tuple[str, ...]) -> wire.Entry:
    return msgspec.structs.replace(entry, **{f: getattr(source, f) for f in fields})


def _word(flag, yes: str, no: str) -> str:
    return yes if flag else no


__all__ = ["DEVICE_NAMES", "Event", "Fleet", "Kit", "KitRecord", "Ledger", "Refused"]
