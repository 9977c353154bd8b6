import json
import zlib

import msgspec
import pytest

from agent import wire

KIT = wire.KitId("sintang", "dedai", "kit-1")


def full_report(**changes) -> wire.Report:
    fields = dict(
        v=1, kab="sintang", kec="dedai", kit="kit-1", ts=1763900000.123, boot="a1b2c3d4e5f60718", seq=42, hb=60,
        p={
            "host": wire.HostEntry(s="ok", cpu=0.12, mem_avail=2_000_000_000, mem_total=8_000_000_000,
                                   disks={"/": wire.Disk(5_000_000_000, 250_000_000_000)}, temps={"coretemp/0": 45.0},
                                   boot=1763800000.0, skew=-0.4),
            "link": wire.LinkEntry(s="warn", c="target_down", m="afis: timed out",
                                   targets={"district": wire.LinkTarget(up=True, rtt=0.023, sent=30, recv=29),
                                            "afis": wire.LinkTarget(up=False, sent=30, recv=0, via="icmp")},
                                   ifaces={"eth0": True}),
            "iris": wire.DeviceEntry(s="missing", c="not_detected"),
            "fingerprint": wire.DeviceEntry(s="ok", vid="1162", pid="0320", serial="A1", bus="1-1.2"),
            "ups": wire.UpsEntry(s="warn", on_batt=True, load=0.14, in_v=0.0, batt_v=24.1, charge=0.6, via="megatec"),
        },
        q=wire.QueueStats(3, 0),
    )
    fields.update(changes)
    return wire.Report(**fields)


@pytest.mark.parametrize("compress", [False, True])
def test_report_round_trip(compress):
    report = full_report()
    data = wire.encode(report, compress=compress)
    assert data[:1] == (b"\x78" if compress else b"{")
    assert wire.decode_report(data, KIT) == report


def test_compression_pays_off_and_dictionary_is_pinned():
    report = full_report()
    plain, packed = wire.encode(report), wire.encode(report, compress=True)
    assert len(packed) < len(plain) / 2
    # The dictionary is part of protocol v1; changing it breaks every deployed collector.
    assert zlib.adler32(wire.ZDICT) == wire.ZDICT_ADLER32
    assert int.from_bytes(packed[2:6], "big") == wire.ZDICT_ADLER32


def test_compact_encoding_omits_defaults():
    entry = wire.DeviceEntry(s="missing", c="not_detected")
    assert wire.encode(full_report(p={"iris": entry}, q=None)).count(b"null") == 0


@pytest.mark.parametrize("compress", [False, True])
def test_idref_entries_round_trip(compress):
    """Entries that leave their identity out and point to an earlier report (agent/identity.py)."""
    report = full_report(p={"fingerprint": wire.DeviceEntry(s="ok", count=1, usable=True, idref=41),
                            "ups": wire.UpsEntry(s="ok", load=0.14, via="megatec", idref=41),
                            "iris": wire.DeviceEntry(s="missing", c="not_detected")})
    data = wire.encode(report, compress=compress)
    assert wire.decode_report(data, KIT) == report
    if not compress:
        assert b'"fingerprint":{"k":"dev","s":"ok","usable":true,"count":1,"idref":41}' in data
    for kind, fields in wire.IDENTITY_FIELDS.items():
        assert set(fields) < set(kind.__struct_fields__) and "idref" in kind.__struct_fields__
    bad = wire.encode(report).replace(b'"idref":41', b'"idref":-1', 1)
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(bad)
    assert err.value.reason == "invalid"


def test_status_round_trip():
    status = wire.Status(v=1, state="online", boot="abcdef0123456789", ts=1.5, agent="0.1.0", connects=2, hb=60,
                         host="pc-dedai", os="linux 6.1")
    assert wire.decode_status(wire.encode(status)) == status


def test_oversized_refused_before_parsing():
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(b"{" + b" " * wire.MAX_REPORT_BYTES + b"}")
    assert err.value.reason == "oversized"


def test_compressed_bomb_refused():
    big = json.dumps({"v": 1, "pad": "x" * 200_000}).encode()
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=wire.ZDICT)
    bomb = packer.compress(big) + packer.flush()
    assert len(bomb) < wire.MAX_REPORT_BYTES
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(bomb)
    assert err.value.reason == "oversized"


def test_compressed_with_other_dictionary_refused():
    data = wire.encode(full_report())
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=b'{"v":2}')
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(packer.compress(data) + packer.flush())
    assert err.value.reason == "malformed"


@pytest.mark.parametrize("payload", [b"", b"{", b"\xff\xfe", b"x" * 10, b'{"v":1,', b"\x78\x9c\x00\x01"])
def test_malformed_refused(payload):
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(payload)
    assert err.value.reason in ("malformed", "invalid")


def test_unknown_version_refused_with_reason():
    doc = msgspec.to_builtins(full_report())
    doc["v"] = 2
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(json.dumps(doc).encode())
    assert err.value.reason == "version"
    assert "2" in err.value.detail
    # a future version with a different shape is still refused as a version, not as garbage
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(b'{"v":3,"totally":"different"}')
    assert err.value.reason == "version"


@pytest.mark.parametrize(
    "path,value",
    [
        (("seq",), "42"),
        (("seq",), 0),
        (("ts",), -5),
        (("kab",), "Sintang Raya"),
        (("kit",), "../../etc"),
        (("p", "host", "cpu"), 7.0),
        (("p", "host", "mem_avail"), -1),
        (("p", "iris", "s"), "broken"),
        (("p", "iris", "k"), "toaster"),
        (("p", "fingerprint", "vid"), "XYZW"),
        (("p", "fingerprint", "pid"), "03 0"),
        (("p", "iris", "c"), "Not Detected"),
        (("kec",), ""),
        (("boot",), "not-hex-at-all"),
        (("q",), [1, 0, "Disk Full"]),
        (("p",), {"Iris Scanner": {"k": "dev", "s": "ok"}}),
        (("p", "link", "targets"), ["district"]),
        (("q",), {"queued": 1}),
        (("p",), {f"probe{i}": {"k": "dev", "s": "ok"} for i in range(40)}),
        (("p", "iris", "m"), "x" * 300),
    ],
)
def test_wrong_types_and_values_refused(path, value):
    doc = msgspec.to_builtins(full_report())
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(json.dumps(doc).encode())
    assert err.value.reason == "invalid"


def test_pattern_checks_hold_after_values_were_seen_and_past_the_cache_limit(monkeypatch):
    # Report patterns are checked after decoding with a cache of values already seen to match;
    # a good value seen before must not open the door to a bad one, and a full cache still checks.
    monkeypatch.setattr(wire._Checked, "LIMIT", 3)
    for i in range(6):
        report = full_report(boot=f"{i:016x}", p={f"probe-{i}": wire.DeviceEntry(s="ok", vid="1162")})
        assert wire.decode_report(wire.encode(report)) == report
    doc = msgspec.to_builtins(full_report())
    doc["p"]["probe-9 "] = {"k": "dev", "s": "ok"}
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(json.dumps(doc).encode())
    assert err.value.reason == "invalid" and "$.p.probe-9 " in str(err.value)


def test_unknown_fields_are_ignored_for_additive_evolution():
    doc = msgspec.to_builtins(full_report())
    doc["future_field"] = {"a": 1}
    doc["p"]["host"]["future_reading"] = 3
    assert wire.decode_report(json.dumps(doc).encode()) == full_report()


def test_nan_and_infinity_refused():
    data = wire.encode(full_report()).replace(b'"cpu":0.12', b'"cpu":NaN')
    with pytest.raises(wire.WireError):
        wire.decode_report(data)
    data = wire.encode(full_report()).replace(b'"cpu":0.12', b'"cpu":1e999')
    with pytest.raises(wire.WireError):
        wire.decode_report(data)


def test_identity_mismatch_refused():
    data = wire.encode(full_report())
    with pytest.raises(wire.WireError) as err:
        wire.decode_report(data, wire.KitId("sintang", "sepauk", "kit-1"))
    assert err.value.reason == "identity"


def test_topics():
    assert wire.topic(KIT, "report") == "ektp/v1/sintang/dedai/kit-1/report"
    assert wire.parse_topic("ektp/v1/sintang/dedai/kit-1/status") == (KIT, "status")
    assert wire.subscription() == "ektp/v1/+/+/+/+"
    assert wire.subscription("sintang", "report") == "ektp/v1/sintang/+/+/report"
    for bad in ["ektp/v2/a/b/c/report", "ektp/v1/a/b/report", "ektp/v1/A/b/c/report", "ektp/v1/a/b/c/other",
                "ektp/v1/a/b/c/d/report", "ektp/v1/a//c/report"]:
        with pytest.raises(wire.WireError) as err:
            wire.parse_topic(bad)
        assert err.value.reason == "topic"
