"""The collector with a real Mosquitto, real agent processes and a real Prometheus."""

import json
import re
import subprocess
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client.parser import text_string_to_metric_families

from agent import wire
from collector.devprometheus import Prometheus
from conftest import http_get, wait_for, write_agent_config

INVENTORY = {"sintang": {"name": "Kabupaten Sintang", "kecamatan": {
    "dedai": {"kits": ["kit-1"], "name": "Dedai"},
    "serawai": {"kits": ["kit-1"]},
    "ambalau": {"kits": ["kit-1", "kit-2"]},  # never reports
}}}


def metrics(collector) -> dict:
    status, body = http_get(f"http://127.0.0.1:{collector.port}/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def kit_labels(kec, kit="kit-1", kab="sintang"):
    return {"kabupaten": kab, "kecamatan": kec, "kit": kit}


def start_agent(tmp_path, broker, agent_process, kec, target_port, kab="sintang", **kw):
    cfg = write_agent_config(tmp_path / f"{kab}-{kec}.yaml", broker, tmp_path / f"state-{kab}-{kec}",
                             kit={"kabupaten": kab, "kecamatan": kec, "id": "kit-1"}, target_port=target_port, **kw)
    return agent_process(cfg)


def publish(broker, topic, payload, retain=False):
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_fleet_end_to_end_through_prometheus(tmp_path, broker, collector_factory, agent_process, tcp_target):
    collector = collector_factory(broker, inventory=INVENTORY, fleet={"required_devices": ["fingerprint"]})
    start_agent(tmp_path, broker, agent_process, "dedai", tcp_target.port)
    start_agent(tmp_path, broker, agent_process, "serawai", tcp_target.port + 0)
    wait_for(lambda: all(collector.fleet.get(wire.KitId("sintang", k, "kit-1")).online for k in ("dedai", "serawai")),
             timeout=15, what="both kits online")
    with Prometheus([f"127.0.0.1:{collector.port}"], workdir=tmp_path / "prometheus") as prom:
        result = wait_for(lambda: prom.query("ektp_kit_online == 1"), timeout=30, what="prometheus to scrape")
        assert {r["metric"]["kecamatan"] for r in result} == {"dedai", "serawai"}
        ready = {r["metric"]["kecamatan"] + "/" + r["metric"]["kit"]: r["value"][1] for r in prom.query("ektp_kit_ready")}
        assert ready == {"dedai/kit-1": "0", "serawai/kit-1": "0", "ambalau/kit-1": "0", "ambalau/kit-2": "0"}
        up = prom.query('ektp_device_up{device="fingerprint"}')
        assert len(up) == 4 and all(r["value"][1] == "0" for r in up), "required but not reported: 0, not absent"
        assert prom.query('ektp_link_up{kecamatan="dedai",target="district"}')[0]["value"][1] == "1"
        states = {r["metric"]["state"]: r["value"][1] for r in prom.query("ektp_collector_kits")}
        assert states == {"ready": "0", "not_ready": "2", "offline": "2"}


def test_expected_kit_that_never_reports_is_exported_as_zero(broker, collector_factory):
    collector = collector_factory(broker, inventory=INVENTORY)
    samples = wait_for(lambda: metrics(collector), what="metrics")
    for kit in ("kit-1", "kit-2"):
        labels = kit_labels("ambalau", kit)
        assert value(samples, "ektp_kit_online", **labels) == 0
        assert value(samples, "ektp_kit_ready", **labels) == 0
        assert value(samples, "ektp_kit_expected", **labels) == 1
        assert value(samples, "ektp_kit_last_report_timestamp_seconds", **labels) is None
    assert value(samples, "ektp_collector_kits", state="offline") == 4


def test_exposition_passes_promtool(tmp_path, broker, collector_factory, agent_process, tcp_target):
    collector = collector_factory(broker, inventory=INVENTORY, fleet={"required_devices": ["fingerprint", "ups"]})
    start_agent(tmp_path, broker, agent_process, "dedai", tcp_target.port,
                probes={"host": {"interval": 1, "temperatures": True}})
    wait_for(lambda: collector.fleet.get(wire.KitId("sintang", "dedai", "kit-1")).online, timeout=15, what="online")
    _, body = http_get(f"http://127.0.0.1:{collector.port}/metrics")
    done = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        (done.stdout + done.stderr).decode()


def test_identity_mismatch_refused_and_counted(broker, collector_factory):
    collector = collector_factory(broker, inventory=INVENTORY)
    victim = wire.KitId("sintang", "serawai", "kit-1")
    forged = wire.Report(v=1, kab="sintang", kec="serawai", kit="kit-1", ts=time.time(),
                         boot="0123456789abcdef", seq=1, hb=60, p={"iris": wire.DeviceEntry(s="ok")})
    publish(broker, "ektp/v1/sintang/dedai/kit-1/report", wire.encode(forged))
    publish(broker, "ektp/v1/sintang/dedai/kit-1/report", b"\x00garbage")
    publish(broker, "ektp/v1/sintang/dedai/kit-1/report", b'{"v":9}')
    publish(broker, "ektp/v1/Sintang/dedai/kit-1/report", wire.encode(forged))
    samples = wait_for(lambda: (s := metrics(collector)) and
                       sum(v for (n, _), v in s.items() if n == "ektp_collector_messages_refused_total") >= 4 and s,
                       what="four refusals")
    refused = {dict(labels)["reason"]: v for (n, labels), v in samples.items()
               if n == "ektp_collector_messages_refused_total"}
    assert refused["identity"] == 1 and refused["malformed"] == 1 and refused["version"] == 1
    assert refused["topic"] == 1
    assert collector.fleet.get(victim).reports == 0, "the victim's state is untouched"
    assert value(samples, "ektp_collector_messages_received_total") == 4


def test_restart_mid_stream_ingests_what_the_broker_queued(tmp_path, broker, collector_factory, agent_process,
                                                          tcp_target):
    first = collector_factory(broker, name="c")
    agent = start_agent(tmp_path, broker, agent_process, "dedai", tcp_target.port)
    kit = wire.KitId("sintang", "dedai", "kit-1")
    wait_for(lambda: first.fleet.get(kit) and first.fleet.get(kit).reports >= 2, timeout=15, what="reports")
    first.close()

    def queued():
        return [int(n) for n in re.findall(r"report (\d+) queued", agent.log())]

    mark = max(queued())
    wait_for(lambda: max(queued()) >= mark + 3, timeout=15, what="reports while the collector is down")
    second = collector_factory(broker, name="c")
    assert second.fleet.get(kit).reports >= 2, "state restored from the store"

    def complete():
        seqs = second.store.ledger(kit)
        ranges = next(iter(seqs.values()), [])
        return len(ranges) == 1 and ranges[0][0] == 1 and ranges[0][1] >= mark + 4

    wait_for(complete, timeout=20, what="a gap-free ledger")
    status, body = http_get(f"http://127.0.0.1:{second.port}/api/kits/sintang/dedai/kit-1/events")
    doc = json.loads(body)
    assert status == 200 and len(doc["ledger"]) == 1
    assert any(e["kind"] == "online" and e["new"] == "online" for e in doc["events"])


def test_two_collectors_split_the_fleet_by_kabupaten(tmp_path, broker, collector_factory, agent_process, tcp_target):
    west = collector_factory(broker, name="west", broker={"kabupaten": ["sintang"]})
    east = collector_factory(broker, name="east", broker={"kabupaten": ["melawi"]})
    start_agent(tmp_path, broker, agent_process, "dedai", tcp_target.port)
    start_agent(tmp_path, broker, agent_process, "nanga-pinoh", tcp_target.port, kab="melawi")
    wait_for(lambda: len(west.fleet.kits) == 1 and len(east.fleet.kits) == 1 and
             all(k.online for c in (west, east) for k in c.fleet.snapshot()), timeout=15, what="both collectors")
    assert [k.id.kabupaten for k in west.fleet.snapshot()] == ["sintang"]
    assert [k.id.kabupaten for k in east.fleet.snapshot()] == ["melawi"]


def test_api_fleet_and_health(tmp_path, broker, collector_factory, agent_process, tcp_target):
    collector = collector_factory(broker, inventory=INVENTORY, fleet={"required_devices": ["fingerprint"]})
    start_agent(tmp_path, broker, agent_process, "dedai", tcp_target.port)
    base = f"http://127.0.0.1:{collector.port}"
    wait_for(lambda: collector.fleet.get(wire.KitId("sintang", "dedai", "kit-1")).online, timeout=15, what="online")
    status, body = http_get(base + "/api/fleet")
    kits = {f"{k['kecamatan']}/{k['kit']}": k for k in json.loads(body)["kits"]}
    dedai = kits["dedai/kit-1"]
    assert dedai["online"] and not dedai["ready"] and dedai["not_ready_because"] == ["fingerprint"]
    assert dedai["kecamatan_name"] == "Dedai" and dedai["kabupaten_name"] == "Kabupaten Sintang"
    assert kits["ambalau/kit-1"]["not_ready_because"] == ["offline"]
    assert "password" not in body.decode().lower()
    assert http_get(base + "/healthz") == (200, b"ok\n")
    assert http_get(base + "/api/kits/sintang/nowhere/kit-1/events")[0] == 404
    assert http_get(base + "/api/kits/x/events")[0] == 400
    broker.stop()
    wait_for(lambda: http_get(base + "/healthz")[0] == 503, timeout=15, what="health to notice the broker is gone")
    assert b"not connected" in http_get(base + "/healthz")[1]
