"""Which report entries carry a device's identity in full, and which point back with `idref`.

The identity of a USB device (vid, pid, vendor, product, serial, bus, driver) or of the UPS
(vendor, model) almost never changes, yet it was most of a compressed heartbeat report. Protocol
v1 lets an entry leave it out and say `idref: N` instead: "exactly as in this probe's entry of
report seq N of this boot". The fields are `wire.IDENTITY_FIELDS`.

An entry carries its identity in full (and no idref) when it is the first of this boot with an
identity for that probe, when the identity differs from the last one sent in full for that probe,
when the entry type of the probe changed since, or when that last full one is `refresh` seconds
old or older (0: always in full). An entry without any identity (a missing device, an error) is
sent as it is, without idref, and leaves the record alone.

Pure logic, no I/O: the runner calls `IdentityTracker.apply` for each entry of a report it makes,
with the report's seq and its monotonic time.
"""

from __future__ import annotations

from typing import NamedTuple

from msgspec import structs

from agent import wire

DEFAULT_REFRESH = 900.0  # seconds; agent config `identity_refresh`


class _Sent(NamedTuple):
    kind: type  # entry type
    identity: tuple  # the values of wire.IDENTITY_FIELDS[kind]
    seq: int  # the report that carried it in full
    at: float  # when (monotonic seconds)


class IdentityTracker:
    def __init__(self, refresh: float = DEFAULT_REFRESH):
        if refresh < 0:
            raise ValueError("refresh must be >= 0")
        self.refresh = refresh
        self._sent: dict[str, _Sent] = {}  # probe name -> its last identity sent in full

    def apply(self, name: str, entry: wire.Entry, seq: int, now: float) -> wire.Entry:
        """The entry as it goes into report `seq`: unchanged, or a copy with idref and without
        identity. The entry passed in is never modified (the runner keeps it for change keys)."""
        kind = type(entry)
        fields = wire.IDENTITY_FIELDS.get(kind)
        if fields is None:  # a kind without identity: a later device entry starts afresh
            self._sent.pop(name, None)
            return entry
        identity = tuple(getattr(entry, f) for f in fields)
        if all(value is None for value in identity):
            return _without_idref(entry)
        last = self._sent.get(name)
        if (self.refresh > 0 and last is not None and last.kind is kind and last.identity == identity
                and now - last.at < self.refresh):
            return structs.replace(entry, idref=last.seq, **dict.fromkeys(fields))
        self._sent[name] = _Sent(kind, identity, seq, now)
        return _without_idref(entry)


def _without_idref(entry):
    return entry if entry.idref is None else structs.replace(entry, idref=None)
