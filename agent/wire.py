"""Wire protocol v1: topics, the retained status message and the report message.

This module is the only place that knows the bytes on the wire; the agent encodes with it and
the collector decodes with it. docs/wire-protocol.md describes the same rules for people.
Decoding is typed and strict: a size limit first, then msgspec validation against the structs
below. Nothing is evaluated.
"""

from __future__ import annotations

import re
import zlib
from typing import Annotated, Literal, NamedTuple, Union

import msgspec
from msgspec import Meta, Struct

SCHEMA_VERSION = 1
TOPIC_PREFIX = "ektp/v1"
MAX_REPORT_BYTES = 16 * 1024
MAX_STATUS_BYTES = 2 * 1024

# Topic levels and probe names: lower case, digits, '-' and '_'; they become Prometheus label
# values and file names, so they are kept short and plain.
SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,47}$"
_SLUG_RE = re.compile(SLUG_PATTERN)

CODE_PATTERN = r"^[a-z0-9_]{0,40}$"
BOOT_PATTERN = r"^[0-9a-f]{8,32}$"
USB_ID_PATTERN = r"^[0-9a-f]{4}$"
PROBLEM_PATTERN = r"^[a-z_]{0,20}$"

Slug = Annotated[str, Meta(pattern=SLUG_PATTERN)]
Label = Annotated[str, Meta(max_length=64)]
Text = Annotated[str, Meta(max_length=256)]
Code = Annotated[str, Meta(pattern=CODE_PATTERN)]
BootId = Annotated[str, Meta(pattern=BOOT_PATTERN)]
# In reports the same patterns are checked after decoding (_check_report): msgspec runs a Python
# regex per constrained string, about 20 per report and most of the decoding time, while the
# values (probe names, codes, USB ids) repeat from report to report and are checked once.
_RSlug = Annotated[str, Meta(min_length=1, max_length=48)]
_RCode = Annotated[str, Meta(max_length=40)]
_RBoot = Annotated[str, Meta(min_length=8, max_length=32)]
_RUsbId = Annotated[str, Meta(min_length=4, max_length=4)]
Count = Annotated[int, Meta(ge=0, le=2**53)]
Seconds = Annotated[float, Meta(ge=0)]

State = Literal["ok", "warn", "missing", "error"]
STATES: tuple[str, ...] = ("ok", "warn", "missing", "error")
# A probe in one of these states means the thing it watches cannot do its job.
FAILING_STATES = frozenset({"missing", "error"})


class WireError(ValueError):
    """A message that is refused. `reason` is a short, bounded token usable as a label value."""

    REASONS = ("oversized", "malformed", "invalid", "version", "topic", "identity")

    def __init__(self, reason: str, detail: str):
        assert reason in self.REASONS
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class KitId(NamedTuple):
    kabupaten: str
    kecamatan: str
    kit: str

    def __str__(self) -> str:
        return f"{self.kabupaten}/{self.kecamatan}/{self.kit}"


def is_slug(value: str) -> bool:
    return bool(_SLUG_RE.match(value))


# ---------------------------------------------------------------------------------------------
# Topics

TOPIC_KINDS = ("status", "report")


def topic(kit: KitId, kind: str) -> str:
    if kind not in TOPIC_KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{TOPIC_PREFIX}/{kit.kabupaten}/{kit.kecamatan}/{kit.kit}/{kind}"


def subscription(kabupaten: str | None = None, kind: str = "+") -> str:
    """Topic filter for a collector: the whole fleet, or one kabupaten."""
    return f"{TOPIC_PREFIX}/{kabupaten or '+'}/+/+/{kind}"


def parse_topic(name: str) -> tuple[KitId, str]:
    parts = name.split("/")
    if len(parts) != 6 or f"{parts[0]}/{parts[1]}" != TOPIC_PREFIX:
        raise WireError("topic", f"not an {TOPIC_PREFIX} kit topic")
    kab, kec, kit, kind = parts[2:]
    if kind not in TOPIC_KINDS:
        raise WireError("topic", "last level must be status or report")
    if not (is_slug(kab) and is_slug(kec) and is_slug(kit)):
        raise WireError("topic", "kabupaten, kecamatan and kit must be lower-case slugs")
    return KitId(kab, kec, kit), kind


# ---------------------------------------------------------------------------------------------
# Status (retained): birth "online" after every connect, Last Will or clean stop "offline".


class Status(Struct, omit_defaults=True, forbid_unknown_fields=False):
    v: int
    state: Literal["online", "offline"]
    boot: BootId
    ts: float = 0.0  # agent clock when the message was made; 0 in a Last Will
    agent: Label = ""  # agent version
    connects: Count = 0  # successful connects since the agent started
    hb: Annotated[int, Meta(ge=1, le=86400)] | None = None  # heartbeat seconds
    host: Label = ""  # host name of the kit PC
    os: Label = ""  # "linux" / "windows" and release
    reason: Code = ""  # offline: "shutdown" (clean stop) or "lost" (Last Will)


# ---------------------------------------------------------------------------------------------
# Report (QoS 1): one entry per probe, keyed by probe name. Each entry kind carries typed
# readings; every reading is optional so a probe in error sends only s/c/m.


class Entry(Struct, tag_field="k", omit_defaults=True, forbid_unknown_fields=False):
    s: State
    c: _RCode = ""  # CODE_PATTERN: reason code, stable and translatable (see agent/messages.py)
    m: Text = ""  # detail in plain words (an exception text, a device name)


class Disk(Struct, array_like=True):
    free: Count  # bytes
    size: Count  # bytes


class HostEntry(Entry, tag="host"):
    cpu: Annotated[float, Meta(ge=0, le=1)] | None = None  # busy ratio since the last run
    mem_avail: Count | None = None  # bytes
    mem_total: Count | None = None  # bytes
    disks: Annotated[dict[Label, Disk], Meta(max_length=16)] = {}  # mount -> [free, size]
    temps: Annotated[dict[Label, float], Meta(max_length=16)] = {}  # sensor -> celsius
    boot: Seconds | None = None  # boot time, unix seconds
    skew: float | None = None  # seconds this clock is ahead of the reference


class LinkTarget(Struct, omit_defaults=True):
    up: bool
    rtt: Seconds | None = None  # last answer's round trip
    sent: Count = 0  # probes sent since the agent started
    recv: Count = 0  # probes answered since the agent started
    via: Literal["tcp", "icmp"] = "tcp"


class LinkEntry(Entry, tag="link"):
    targets: Annotated[dict[Label, LinkTarget], Meta(max_length=16)] = {}
    ifaces: Annotated[dict[Label, bool], Meta(max_length=16)] = {}  # interface -> up


class DeviceEntry(Entry, tag="dev"):
    vid: _RUsbId | None = None  # USB_ID_PATTERN
    pid: _RUsbId | None = None  # USB_ID_PATTERN
    vendor: Label | None = None
    product: Label | None = None
    serial: Label | None = None
    bus: Label | None = None  # bus position, e.g. "1-1.4"
    driver: Label | None = None
    problem: Count | None = None  # Windows device problem code
    usable: bool | None = None  # a deeper check (V4L2 QUERYCAP, PC/SC) passed
    count: Count | None = None  # matching units present
    idref: Count | None = None  # identity left out: as in report seq idref of this boot (IDENTITY_FIELDS)


class UpsEntry(Entry, tag="ups"):
    on_batt: bool | None = None
    batt_low: bool | None = None
    failed: bool | None = None
    test: bool | None = None  # self-test in progress
    shutdown: bool | None = None
    bypass: bool | None = None  # bypass / boost / buck active
    load: Annotated[float, Meta(ge=0, le=10)] | None = None  # ratio of rated load
    in_v: Annotated[float, Meta(ge=0, le=1000)] | None = None
    out_v: Annotated[float, Meta(ge=0, le=1000)] | None = None
    in_hz: Annotated[float, Meta(ge=0, le=1000)] | None = None
    batt_v: Annotated[float, Meta(ge=0, le=1000)] | None = None
    temp: Annotated[float, Meta(ge=-100, le=200)] | None = None
    charge: Annotated[float, Meta(ge=0, le=1)] | None = None  # estimated from batt_v
    vendor: Label | None = None
    model: Label | None = None
    via: Literal["megatec", "nut", "apcupsd"] | None = None
    idref: Count | None = None  # identity left out: as in report seq idref of this boot (IDENTITY_FIELDS)


# The identity of a device or UPS: what almost never changes. An entry with `idref` set leaves
# these fields out because they are exactly those of the same probe's entry in the report with
# seq == idref of the same boot, which carried them in full (agent/identity.py decides when).
IDENTITY_FIELDS: dict[type[Entry], tuple[str, ...]] = {
    DeviceEntry: ("vid", "pid", "vendor", "product", "serial", "bus", "driver"),
    UpsEntry: ("vendor", "model"),
}


AnyEntry = Union[HostEntry, LinkEntry, DeviceEntry, UpsEntry]
ENTRY_TYPES: dict[str, type[Entry]] = {
    "host": HostEntry,
    "link": LinkEntry,
    "dev": DeviceEntry,
    "ups": UpsEntry,
}


class QueueStats(Struct, array_like=True, omit_defaults=True):
    queued: Count  # reports waiting in the agent's store-and-forward queue
    dropped: Count  # reports dropped because the queue was full, ever
    # why the queue is held in memory instead of on disk: disk_full, read_only, io_error
    problem: Annotated[str, Meta(max_length=20)] = ""  # PROBLEM_PATTERN


class Report(Struct, omit_defaults=True, forbid_unknown_fields=False):
    v: int
    kab: _RSlug  # SLUG_PATTERN, as kec, kit and the probe names in p
    kec: _RSlug
    kit: _RSlug
    ts: Seconds  # agent clock, unix seconds
    boot: _RBoot  # BOOT_PATTERN; random per agent start; (boot, seq) identifies a report
    seq: Annotated[int, Meta(ge=1, le=2**53)]
    hb: Annotated[int, Meta(ge=1, le=86400)]  # heartbeat seconds: the next report is due by then
    p: Annotated[dict[_RSlug, AnyEntry], Meta(max_length=32)]
    replay: bool = False  # sent from the backlog after an outage
    q: QueueStats | None = None

    @property
    def kit_id(self) -> KitId:
        return KitId(self.kab, self.kec, self.kit)


class _Envelope(Struct, forbid_unknown_fields=False):
    v: int


# Reports may be sent zlib-compressed (RFC 1950) with this preset dictionary: a 1 kB report of a
# full kit shrinks to about 220 bytes, which matters on metered kecamatan links. The dictionary
# is part of protocol v1 and must never change; its Adler-32 travels in every compressed
# payload's header, so a mismatch is refused rather than misread.
ZDICT = (
    b'{"v":1,"kab":"","kec":"","kit":"kit-1","ts":17,"boot":"","seq":,"hb":60,"p":{"host":'
    b'{"k":"host","s":"ok","cpu":0.,"mem_avail":,"mem_total":,"disks":{"/":[,]},"temps":{},'
    b'"boot":17,"skew":},"link":{"k":"link","s":"ok","targets":{"district":{"up":true,"rtt":0.0,'
    b'"sent":,"recv":,"via":"icmp"}},"ifaces":{"eth0":true}},"fingerprint":{"k":"dev","s":"ok",'
    b'"vid":"","pid":"","vendor":"","product":"","serial":"","bus":"1-1","driver":"usb"},"iris":'
    b'{"k":"dev","s":"missing","c":"not_detected"},"camera":{"k":"dev","s":"ok","usable":true},'
    b'"signature_pad":{"k":"dev","s":"error"},"card_reader":{"k":"dev","s":"ok"},"ups":{"k":"ups",'
    b'"s":"ok","on_batt":false,"batt_low":false,"load":0.,"in_v":2,"out_v":2,"in_hz":50.0,'
    b'"batt_v":,"temp":,"charge":1.0,"via":"megatec"}},"replay":true,"q":[0,0]}'
)
ZDICT_ADLER32 = 0xDAABEA52  # pinned by tests/test_wire.py

_encoder = msgspec.json.Encoder()
_report_decoder = msgspec.json.Decoder(Report)
_status_decoder = msgspec.json.Decoder(Status)
_envelope_decoder = msgspec.json.Decoder(_Envelope)


def encode(message: Report | Status, compress: bool = False) -> bytes:
    data = _encoder.encode(message)
    if not compress:
        return data
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=ZDICT)
    return packer.compress(data) + packer.flush()


def _inflate(payload: bytes, limit: int) -> bytes:
    unpacker = zlib.decompressobj(zdict=ZDICT)
    try:
        data = unpacker.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise WireError("malformed", f"compressed payload: {exc}") from None
    if len(data) > limit or unpacker.unconsumed_tail:
        raise WireError("oversized", f"expands past {limit} bytes")
    if not unpacker.eof:
        raise WireError("malformed", "compressed payload is truncated")
    return data


def _decode(decoder: msgspec.json.Decoder, payload: bytes, limit: int):
    if len(payload) > limit:
        raise WireError("oversized", f"{len(payload)} bytes, limit {limit}")
    if payload[:1] == b"\x78":
        payload = _inflate(payload, limit)
    try:
        message = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        _refuse_other_version(payload)
        raise WireError("invalid", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise WireError("malformed", str(exc)) from None
    except RecursionError:
        raise WireError("malformed", "nested too deeply") from None
    if message.v != SCHEMA_VERSION:
        raise WireError("version", f"schema version {message.v}, this side speaks {SCHEMA_VERSION}")
    return message


def _refuse_other_version(payload: bytes) -> None:
    try:
        version = _envelope_decoder.decode(payload).v
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return
    if version != SCHEMA_VERSION:
        raise WireError("version", f"schema version {version}, this side speaks {SCHEMA_VERSION}")


class _Checked:
    """Values already seen to match a pattern, so a repeated value costs a set lookup."""

    LIMIT = 4096  # past this many values, new ones are matched each time: the set stays bounded

    __slots__ = ("regex", "pattern", "seen")

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.regex = re.compile(pattern)
        self.seen: set[str] = set()

    def need(self, value: str, where: str) -> None:
        if value in self.seen:
            return
        if not self.regex.match(value):
            raise WireError("invalid", f"Expected `str` matching regex {self.pattern!r} - at `$.{where}`")
        if len(self.seen) < self.LIMIT:
            self.seen.add(value)


class _ReportChecks:
    def __init__(self):
        self.slug = _Checked(SLUG_PATTERN)
        self.code = _Checked(CODE_PATTERN)
        self.boot = _Checked(BOOT_PATTERN)
        self.usb_id = _Checked(USB_ID_PATTERN)
        self.problem = _Checked(PROBLEM_PATTERN)

    def __call__(self, report: Report) -> None:
        slug, code, usb_id = self.slug, self.code, self.usb_id
        slugs, codes, usb_ids = slug.seen, code.seen, usb_id.seen
        if report.kab not in slugs or report.kec not in slugs or report.kit not in slugs:
            slug.need(report.kab, "kab")
            slug.need(report.kec, "kec")
            slug.need(report.kit, "kit")
        if report.boot not in self.boot.seen:
            self.boot.need(report.boot, "boot")
        for name, entry in report.p.items():
            if name not in slugs:
                slug.need(name, f"p.{name}")
            if entry.c and entry.c not in codes:
                code.need(entry.c, f"p.{name}.c")
            if type(entry) is DeviceEntry:
                if entry.vid is not None and entry.vid not in usb_ids:
                    usb_id.need(entry.vid, f"p.{name}.vid")
                if entry.pid is not None and entry.pid not in usb_ids:
                    usb_id.need(entry.pid, f"p.{name}.pid")
        if report.q is not None and report.q.problem:
            self.problem.need(report.q.problem, "q[2]")


_check_report = _ReportChecks()


def decode_report(payload: bytes, expect: KitId | None = None) -> Report:
    report: Report = _decode(_report_decoder, payload, MAX_REPORT_BYTES)
    _check_report(report)
    if expect is not None and report.kit_id != expect:
        raise WireError("identity", f"payload says {report.kit_id}, topic says {expect}")
    return report


def decode_status(payload: bytes) -> Status:
    return _decode(_status_decoder, payload, MAX_STATUS_BYTES)
