"""Hostile and malformed input: nothing crashes, everything refused is counted by reason, other
kits are unaffected and memory stays bounded (counted in kits and rows, not RSS)."""

import json
import math
import time

import msgspec
import paho.mqtt.client as paho
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import wire
from agent.config import ConfigError
from agent.config import load as load_agent
from collector.fleet import Fleet
from collector.ingest import Ingest
from conftest import wait_for

T0 = time.time()
GOOD = wire.KitId("sintang", "dedai", "kit-1")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=300),
    lambda children: st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=12), children, max_size=8),
    max_leaves=60,
)


def good_report(seq=1, **kw) -> wire.Report:
    return wire.Report(v=1, kab=GOOD.kabupaten, kec=GOOD.kecamatan, kit=GOOD.kit, ts=T0, boot="00000000", seq=seq,
                       hb=60, p={"fingerprint": wire.DeviceEntry(s="ok", serial="A")}, **kw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(payload):
    try:
        wire.decode_report(payload)
    except wire.WireError as exc:
        assert exc.reason in wire.WireError.REASONS
    try:
        wire.decode_status(payload)
    except wire.WireError as exc:
        assert exc.reason in wire.WireError.REASONS


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_json_never_crashes_the_decoder(value):
    payload = json.dumps(value, allow_nan=True).encode()  # NaN/Infinity tokens included
    try:
        report = wire.decode_report(payload)
    except wire.WireError as exc:
        assert exc.reason in ("invalid", "malformed", "oversized", "version")
    else:
        assert report.v == 1


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["kab", "kec", "kit", "ts", "boot", "seq", "hb", "p", "q", "replay"]), json_values)
def test_mutated_reports_are_valid_or_refused_never_half_read(field, value):
    doc = msgspec.to_builtins(good_report())
    doc[field] = value
    try:
        report = wire.decode_report(json.dumps(doc, allow_nan=True).encode())
    except wire.WireError:
        return
    for number in (report.ts, report.seq, report.hb):
        assert math.isfinite(number) and number >= 0


@pytest.mark.parametrize("payload", [
    b"[" * 100_000, b'{"a":' * 5000, b'{"v":1,"p":{"x":' + b"[" * 8000, b'"' + b"x" * 20_000 + b'"',
    b'{"v":1,"kab":"' + "é\u202e\x00".encode() * 10 + b'"}', b"\x78\x9c" + b"\xff" * 100,
], ids=["deep-array", "deep-object", "deep-in-probes", "huge-string", "control-chars-in-name", "bad-zlib"])
def test_pathological_payloads(payload):
    with pytest.raises(wire.WireError):
        wire.decode_report(payload)


def ingest_for(max_kits=50, unknown="accept") -> Ingest:
    """The collector's ingest path (topic, wire, fleet) without a network client."""
    import tempfile
    from pathlib import Path

    from collector.config import load

    path = Path(tempfile.mkdtemp()) / "collector.yaml"
    path.write_text(yaml.safe_dump({"broker": {"url": "mqtt://127.0.0.1"},
                                    "fleet": {"max_kits": max_kits, "unknown_kits": unknown, "required_devices": []},
                                    "inventory": {"sintang": {"kecamatan": {"dedai": {"kits": ["kit-1"]}}}}}))
    config = load(path)
    return Ingest(config, Fleet(config.raw), store=None)


topic_levels = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(topic_levels, topic_levels, topic_levels, st.sampled_from(["report", "status", "x"]),
                          st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())),
                max_size=30))
def test_ingest_path_counts_everything_and_protects_other_kits(messages):
    ingest = ingest_for(max_kits=20)
    ingest.process([("ektp/v1/sintang/dedai/kit-1/report", wire.encode(good_report()), 1, 1)], T0)
    batch = [(f"ektp/v1/{a}/{b}/{c}/{kind}", payload, i, 1) for i, (a, b, c, kind, payload) in enumerate(messages)]
    ingest.process(batch, T0)
    accepted_reports = sum(k.reports for k in ingest.fleet.kits.values())
    assert ingest.received == len(batch) + 1
    assert sum(ingest.refused.values()) <= len(batch)
    assert len(ingest.fleet.kits) <= 20, "the kit cap holds"
    good = ingest.fleet.get(GOOD)
    assert good.reports == 1 and good.entries["fingerprint"].s == "ok", "the good kit is untouched"
    assert accepted_reports >= 1


def test_flood_of_new_kit_names_stops_at_the_cap():
    ingest = ingest_for(max_kits=100)
    batch = []
    for i in range(5000):
        report = wire.Report(v=1, kab="sintang", kec=f"fake-{i}", kit="kit-1", ts=T0, boot="00000000", seq=1, hb=60,
                             p={})
        batch.append((f"ektp/v1/sintang/fake-{i}/kit-1/report", wire.encode(report), i, 1))
    ingest.process(batch, T0)
    assert len(ingest.fleet.kits) == 100
    assert ingest.refused["capacity"] == 5000 - 99


def test_barrage_through_the_real_broker(broker, collector_factory, figures):
    """100,000 mixed bad messages: the collector stays healthy and its counters add up."""
    collector = collector_factory(broker, fleet={"max_kits": 200, "required_devices": []})
    bad = [
        ("ektp/v1/sintang/dedai/kit-1/report", b"\x00garbage"),  # malformed
        ("ektp/v1/sintang/dedai/kit-1/report", b'{"v":7}'),  # version
        ("ektp/v1/sintang/dedai/kit-1/report", b'{"v":1,"kab":"x"}'),  # invalid
        ("ektp/v1/sintang/dedai/kit-1/report", b"{" + b" " * 17000 + b"}"),  # oversized
        ("ektp/v1/Sintang/dedai/kit-1/report", b"{}"),  # topic
        ("ektp/v1/sintang/other/kit-1/report", wire.encode(good_report())),  # identity
    ]
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    total = 100_000
    started = time.monotonic()
    for start in range(0, total, 10_000):  # in chunks: MQTT packet ids wrap at 65,535
        infos = [client.publish(*bad[i % len(bad)], qos=1) for i in range(start, start + 10_000)]
        for info in infos:
            info.wait_for_publish(60)
    wait_for(lambda: collector.ingest.received >= total, timeout=120, interval=0.2, what="every message")
    elapsed = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    refused = dict(collector.ingest.refused)
    per_kind = total // len(bad)
    figures.update(messages_sent=total, messages_received=collector.ingest.received, seconds=round(elapsed, 1),
                   refused_by_reason={k: v for k, v in refused.items() if v})
    assert collector.ingest.received == total
    assert sum(refused.values()) == total
    for reason in ("malformed", "version", "invalid", "oversized", "topic", "identity"):
        assert refused[reason] in (per_kind, per_kind + 1), (reason, refused)
    assert len(collector.fleet.kits) == 0
    assert collector.ingest.connected.is_set()


@pytest.mark.parametrize("change,key", [
    ({"heartbeat": 10**30}, "heartbeat"),
    ({"heartbeat": -60}, "heartbeat"),
    ({"probes": {"host": {"interval": -1}}}, "probes.host.interval"),
    ({"probes": {"host": {"interval": float("nan")}}}, "probes.host.interval"),
    ({"queue": {"max_size": "99999999GB"}}, "queue.max_size"),
    ({"broker": {"url": "mqtt://h", "keepalive": 10**12}}, "broker.keepalive"),
    ({"probes": {"link": {"targets": {}}}}, "probes.link.targets"),
    ({"probes": {"fingerprint": {"ids": ["zzzz:0000"]}}}, "probes.fingerprint.ids[0]"),
])
def test_hostile_agent_config_values(tmp_path, change, key):
    doc = {"kit": {"kabupaten": "sintang", "kecamatan": "dedai", "id": "kit-1"},
           "broker": {"url": "mqtt://127.0.0.1"}, "state_dir": str(tmp_path), "probes": {"host": {}}}
    doc.update(change)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    with pytest.raises(ConfigError) as err:
        load_agent(path)
    assert err.value.key == key, str(err.value)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        lines.append(f"{'abcdefghijklm'[i]}: &{'abcdefghijklm'[i]} [" + ", ".join([f"*{'abcdefghijklm'[i - 1]}"] * 10) + "]")
    lines.append("kit: *l")
    path = tmp_path / "agent.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_agent(path)
    assert time.monotonic() - started < 5
    assert "alias" in err.value.message


def test_device_path_that_does_not_exist_is_a_probe_error_not_a_traceback(tmp_path):
    from agent.cli import check

    doc = {"kit": {"kabupaten": "sintang", "kecamatan": "dedai", "id": "kit-1"},
           "broker": {"url": "mqtt://127.0.0.1"}, "state_dir": str(tmp_path),
           "paths": {"sysfs": str(tmp_path / "no-sysfs")},
           "probes": {"camera": {"ids": ["046d:082d"], "v4l2": "/dev/no-such-video"},
                      "ups": {"driver": "megatec", "port": "/dev/no-such-tty"}}}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    import io

    out = io.StringIO()
    assert check(load_agent(path), lang="en", out=out) == 1
    text = out.getvalue()
    assert "Traceback" not in text and "[FAILED]" in text
