"""Grafana dashboards: the JSON model's structure, and every panel query against a real Prometheus.

No Grafana server can run here, so the dashboards are proven in two steps. The structural tests
check what Grafana needs from the JSON (ids, grid, datasource, targets, variables, units). The
semantic test runs a real fleet (Mosquitto, the collector, agent processes on fixture devices and
a Megatec UPS emulator, some kits broken, one never reporting), lets a real Prometheus scrape the
collector, and evaluates every panel target with template variables replaced by real label values:
each must parse and return at least one series. A query that returns nothing is a broken panel.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import threading
import time
import urllib.error

import paho.mqtt.client as paho
import psutil
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import wire
from collector.devbroker import free_port
from collector.devprometheus import Prometheus
from conftest import ROOT, wait_for, write_agent_config

DASHBOARDS = ROOT / "dashboards"
UIDS = {
    "fleet-overview.json": "ektp-fleet-overview",
    "kit-detail.json": "ektp-kit-detail",
    "collector-health.json": "ektp-collector-health",
}
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
NO_QUERY_PANELS = {"row", "text"}
# Grafana's own variables, as the semantic test replaces them (a 5 minute range, 15 s steps).
MACROS = {"__rate_interval": "1m", "__interval": "15s", "__interval_ms": "15000", "__range": "5m",
          "__range_s": "300", "__range_ms": "300000"}
RANGE_SECONDS, STEP_SECONDS = 300, 15
VAR_RE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)|\[\[(\w+)(?::[\w-]+)?\]\]")
LABEL_VALUES_RE = re.compile(r"^label_values\((?:(.+),\s*)?(\w+)\)$")
METRIC_RE = re.compile(r"\b(ektp_[a-z0-9_]+)\b")


def load(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text(encoding="utf-8"))


def query_panels(doc: dict) -> list[dict]:
    return [p for p in doc["panels"] if p["type"] not in NO_QUERY_PANELS]


def variables(doc: dict) -> dict[str, dict]:
    return {v["name"]: v for v in doc["templating"]["list"]}


def variable_query(var: dict) -> str:
    query = var.get("query")
    return query["query"] if isinstance(query, dict) else query


def used_variables(text: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in VAR_RE.finditer(text)]


def substitute(text: str, values: dict[str, str]) -> str:
    def one(match):
        name = next(g for g in match.groups() if g)
        if name in MACROS:
            return MACROS[name]
        return values[name]

    return VAR_RE.sub(one, text)


def contract_names() -> set[str]:
    """Metric names as exposed, from the metric contract (collector/metrics.py)."""
    from collector.metrics import metric_names

    return metric_names()


# ---------------------------------------------------------------------------------------------
# Structure


def test_generated_json_is_up_to_date():
    spec = importlib.util.spec_from_file_location("ektp_dashboards_build", DASHBOARDS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    expected = build.build()
    assert set(expected) == set(UIDS)
    stale = [name for name, text in expected.items() if (DASHBOARDS / name).read_text(encoding="utf-8") != text]
    assert not stale, f"out of date: {stale}; run: python dashboards/build.py"


@pytest.mark.parametrize("name", sorted(UIDS))
def test_dashboard_model(name):
    doc = load(name)
    assert isinstance(doc.get("schemaVersion"), int) and doc["schemaVersion"] >= 36
    assert doc["uid"] == UIDS[name], "uids are stable: links and bookmarks depend on them"
    assert doc["title"] and doc["description"]
    assert "__inputs" not in doc, "the datasource is a variable, so the file imports and provisions as it is"

    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    boxes = []
    for p in doc["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h")), p["title"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1 and g["x"] + g["w"] <= 24, p["title"]
        for other_title, o in boxes:
            overlap = (g["x"] < o["x"] + o["w"] and o["x"] < g["x"] + g["w"] and
                       g["y"] < o["y"] + o["h"] and o["y"] < g["y"] + g["h"])
            assert not overlap, f"{p['title']!r} overlaps {other_title!r}"
        boxes.append((p["title"], g))

    panels = query_panels(doc)
    assert panels
    for p in panels:
        what = f"{name}: panel {p['id']} {p['title']!r}"
        assert p["title"] and p.get("description"), what
        assert p.get("datasource") == DS_REF, f"{what}: datasource must be ${{datasource}}"
        assert p.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{what}: no unit"
        assert p.get("targets"), f"{what}: no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), what
        for t in p["targets"]:
            assert t.get("datasource") == DS_REF, f"{what} {t['refId']}: datasource must be ${{datasource}}"
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), f"{what} {t['refId']}: no expr"
        # table columns named after a query ("Value #B") must name one that exists
        for override in p["fieldConfig"].get("overrides", []):
            matched = override["matcher"].get("options", "")
            if isinstance(matched, str) and matched.startswith("Value #"):
                assert matched[len("Value #"):] in refs, f"{what}: override for missing query {matched}"


@pytest.mark.parametrize("name", sorted(UIDS))
def test_variables_resolve(name):
    doc = load(name)
    declared = variables(doc)
    assert declared["datasource"]["type"] == "datasource" and declared["datasource"]["query"] == "prometheus"
    order = list(declared)
    for position, (var_name, var) in enumerate(declared.items()):
        if var["type"] != "query":
            continue
        assert var["datasource"] == DS_REF, var_name
        query = variable_query(var)
        assert LABEL_VALUES_RE.match(query), f"{var_name}: {query}"
        for used in used_variables(query):
            # chained: a variable may only use variables defined before it
            assert used in declared and order.index(used) < position, f"{var_name} uses {used}"
    for p in query_panels(doc):
        for t in p["targets"]:
            for used in used_variables(t["expr"]):
                assert used in declared or used in MACROS, f"{p['title']!r}: ${used} is not defined"


def test_kabupaten_kecamatan_kit_variables_are_chained():
    fleet, kit = variables(load("fleet-overview.json")), variables(load("kit-detail.json"))
    assert variable_query(fleet["kabupaten"]) == "label_values(ektp_kit_info, kabupaten)"
    assert list(kit)[1:] == ["kabupaten", "kecamatan", "kit"]
    assert "$kabupaten" in variable_query(kit["kecamatan"]) and "$kecamatan" in variable_query(kit["kit"])


@pytest.mark.parametrize("name", sorted(UIDS))
def test_metric_names_are_in_the_contract(name):
    known = contract_names()
    assert "ektp_kit_ready" in known and "ektp_link_probes_sent_total" in known  # the reader works
    doc = load(name)
    texts = [t["expr"] for p in query_panels(doc) for t in p["targets"]]
    texts += [variable_query(v) for v in doc["templating"]["list"] if v["type"] == "query"]
    unknown = {m for text in texts for m in METRIC_RE.findall(text)} - known
    assert not unknown, f"not in collector/metrics.py: {sorted(unknown)}"


def test_provisioning_files():
    sources = yaml.safe_load((DASHBOARDS / "provisioning/datasources/ektp.yaml").read_text())
    assert sources["apiVersion"] == 1
    [source] = sources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] and source["url"].startswith("http")
    providers = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/ektp.yaml").read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    readme = (DASHBOARDS / "README.md").read_text(encoding="utf-8")
    assert provider["options"]["path"] in readme, "the README says where the JSON files go"
    assert "/etc/grafana/provisioning" in readme


# ---------------------------------------------------------------------------------------------
# Semantic: a real fleet, a real Prometheus, every query

KAB = "sintang"
# dedai: everything works (UPS on mains); serawai: fingerprint unplugged, mains failure, district
# unreachable; sintang: iris without a driver, no UPS; ambalau: in the inventory, never reports.
INVENTORY = {KAB: {"name": "Kabupaten Sintang", "kecamatan": {
    # coordinates illustrative, for the map panel
    "dedai": {"kits": ["kit-1"], "name": "Dedai", "lat": -0.05, "lon": 111.25},
    "serawai": {"kits": ["kit-1"], "name": "Serawai", "lat": -0.55, "lon": 112.55},
    "sintang": {"kits": ["kit-1"], "name": "Sintang", "lat": 0.07, "lon": 111.5},
    "ambalau": {"kits": ["kit-1"], "name": "Ambalau"},
}}}
REQUIRED = ["fingerprint", "iris", "camera", "signature_pad"]
SYSFS = ROOT / "tests" / "fixtures" / "sysfs"
# The fixture kit's USB ids (tests/fixtures/sysfs/build.py).
USB_IDS = {"fingerprint": "05ba:000a", "iris": "1d6b:0104", "camera": "046d:082d", "signature_pad": "056a:00a2",
           "card_reader": "072f:90cc"}
AGENTS = {
    "dedai": {"sysfs": "all-present", "ups": "mains", "link": "open"},
    "serawai": {"sysfs": "fingerprint-missing", "ups": "mains_failure", "link": "closed"},
    "sintang": {"sysfs": "iris-no-driver", "ups": None, "link": "open"},
}
KIT_DETAIL_SHOWS = "dedai"  # the kit with every kind of data: devices, UPS, answered link


class DateServer:
    """An HTTP server whose Date header is the clock reference (the district server in real life)."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 - the standard library's name
                self.send_response(204)  # send_response adds the Date header
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def date_server():
    server = DateServer()
    yield server
    server.close()


def probe_types() -> set[str]:
    from agent.probes import REGISTRY

    return set(REGISTRY)


def agent_probes(types: set[str], link_port: int, clock_url: str, ups_port: str | None) -> dict:
    fast = {"interval": 1, "timeout": 1}
    probes = {
        "host": {**fast, "temperatures": True, "clock_reference": clock_url},
        "link": {"interval": 0.5, "timeout": 0.5, "count": 1, "attempt_timeout": 0.2, "interfaces": ["lo"],
                 "targets": {"district": {"host": "127.0.0.1", "port": link_port}}},
    }
    for device in ("fingerprint", "iris", "signature_pad"):
        if "usb" in types:
            probes[device] = {**fast, "type": "usb", "ids": [USB_IDS[device]]}
    if "usb" in types:
        probes["fingerprint"]["serial"] = "TEST-FP-0001"
    if "camera" in types or "usb" in types:
        probes["camera"] = {**fast, "type": "camera" if "camera" in types else "usb", "ids": [USB_IDS["camera"]]}
    if "card_reader" in types:
        probes["card_reader"] = {**fast, "type": "card_reader", "ids": [USB_IDS["card_reader"]], "pcsc": False}
    if ups_port and "ups" in types:
        probes["ups"] = {**fast, "type": "ups", "driver": "megatec", "port": ups_port, "reply_timeout": 0.5}
    return probes


def publish(broker, topic: str, payload: bytes) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def api(prom: Prometheus, path: str, **params) -> dict:
    """Prometheus's answer, also for a query it refuses (HTTP 400 with an error document)."""
    try:
        return prom.api(path, **params)
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"{}") | {"http_status": exc.code}


def label_values(prom: Prometheus, query: str, values: dict[str, str]) -> list[str]:
    """What Grafana's label_values(metric, label) offers, through the same Prometheus API."""
    match = LABEL_VALUES_RE.match(substitute(query, values))
    assert match, query
    selector, label = match.groups()
    now = time.time()
    params = {"start": now - RANGE_SECONDS, "end": now}
    if selector:
        params["match[]"] = selector
    doc = api(prom, f"label/{label}/values", **params)
    assert doc.get("status") == "success", f"{query}: {doc}"
    return doc["data"]


def grafana_multi(values: list[str]) -> str:
    """A multi-value variable with several values selected, as Grafana formats it for Prometheus."""
    return values[0] if len(values) == 1 else "(" + "|".join(values) + ")"


def test_every_panel_query_returns_data(tmp_path, broker, collector_factory, agent_process, tcp_target,
                                        date_server):
    from collector.upsemu import MegatecPty, MegatecUps

    types = probe_types()
    collector = collector_factory(broker, inventory=INVENTORY, fleet={"required_devices": REQUIRED})
    closed_port = free_port()  # nothing listens: the district server is unreachable from serawai
    emulators = []
    try:
        for kec, spec in AGENTS.items():
            ups_port = None
            if spec["ups"] and "ups" in types:
                pty = MegatecPty(MegatecUps(spec["ups"], vendor="EMULATED UPS", model="MEGA-1000")).start()
                emulators.append(pty)
                ups_port = pty.path
            link_port = tcp_target.port if spec["link"] == "open" else closed_port
            probes = agent_probes(types, link_port, date_server.url, ups_port)
            cfg = write_agent_config(tmp_path / f"agent-{kec}.yaml", broker, tmp_path / f"state-{kec}",
                                     kit={"kabupaten": KAB, "kecamatan": kec, "id": "kit-1"}, probes=probes,
                                     paths={"sysfs": str(SYSFS / spec["sysfs"])})
            agent_process(cfg)
        # a sender the collector must refuse, so the refusal panels have a reason to show
        publish(broker, f"ektp/v1/{KAB}/dedai/kit-1/report", b"\x00not a report")

        def fleet_complete():
            kits = {kec: collector.fleet.get(wire.KitId(KAB, kec, "kit-1")) for kec in AGENTS}
            for kec, kit in kits.items():
                wanted = set(agent_probes(types, 1, "", "x" if AGENTS[kec]["ups"] else None))
                if kit is None or not kit.online or not wanted <= set(kit.entries):
                    return False
            dedai, serawai = kits["dedai"].entries, kits["serawai"].entries
            if dedai["host"].skew is None or not dedai["link"].targets["district"].up:
                return False
            if serawai["link"].targets["district"].up or not serawai["link"].targets["district"].sent:
                return False
            if "ups" in types and not (dedai["ups"].in_v and serawai["ups"].on_batt):
                return False
            return collector.ingest.refused.get("malformed", 0) >= 1

        wait_for(fleet_complete, timeout=40, interval=0.1, what="every agent's first full report")

        with Prometheus([f"127.0.0.1:{collector.port}"], workdir=tmp_path / "prometheus", interval="1s") as prom:
            wait_for(lambda: prom.query('min(count_over_time(up{job="ektp-collector"}[1m])) >= 2'), timeout=30,
                     interval=0.2, what="two scrapes of the collector")
            instance = f"127.0.0.1:{collector.port}"
            evaluated, failures = [], []

            for name in sorted(UIDS):
                doc = load(name)
                values = resolve_variables(prom, name, variables(doc), instance)
                for p in query_panels(doc):
                    for t in p["targets"]:
                        expr = substitute(t["expr"], values)
                        now = time.time()
                        if t.get("instant"):
                            doc_ = api(prom, "query", query=expr, time=now)
                        else:
                            doc_ = api(prom, "query_range", query=expr, start=now - RANGE_SECONDS, end=now,
                                       step=STEP_SECONDS)
                        evaluated.append(expr)
                        where = f"{name} panel {p['id']} {p['title']!r} {t['refId']}: {expr}"
                        if doc_.get("status") != "success":
                            failures.append(f"{where}\n    refused: {doc_.get('error')}")
                        elif not doc_["data"]["result"]:
                            failures.append(f"{where}\n    returned no series")

            assert not failures, f"{len(failures)} of {len(evaluated)} panel queries are broken:\n" + "\n".join(failures)
            total = sum(len(p["targets"]) for n in UIDS for p in query_panels(load(n)))
            assert len(evaluated) == total and total >= 50

            # Every contract metric a dashboard names has data, so no `or` hides a dead half.
            # PC temperature sensors exist only where the OS exposes them (not in most containers).
            named = {m for n in UIDS for p in query_panels(load(n)) for t in p["targets"]
                     for m in METRIC_RE.findall(t["expr"])}
            may_be_empty = set() if psutil.sensors_temperatures() else {"ektp_host_temperature_celsius"}
            empty = sorted(m for m in named - may_be_empty if not prom.query(f'count({{__name__="{m}"}})'))
            assert not empty, f"metrics named by dashboards without data: {empty}"
    finally:
        for pty in emulators:
            pty.close()


def resolve_variables(prom: Prometheus, name: str, declared: dict[str, dict], instance: str) -> dict[str, str]:
    """Values for the dashboard's variables, taken from its own variable queries in order, so the
    chain kabupaten -> kecamatan -> kit is exercised too."""
    values: dict[str, str] = {"datasource": "ektp-prometheus"}
    choose = {"kabupaten": KAB, "kecamatan": KIT_DETAIL_SHOWS, "kit": "kit-1", "job": "ektp-collector",
              "instance": instance}
    for var_name, var in declared.items():
        if var["type"] != "query":
            continue
        offered = label_values(prom, variable_query(var), values)
        wanted = choose[var_name]
        assert wanted in offered, f"{name}: variable {var_name} offers {offered}, not {wanted}"
        if var_name == "kecamatan":
            assert set(offered) == set(INVENTORY[KAB]["kecamatan"]), f"{name}: kecamatan offers {offered}"
        if var.get("multi"):
            # the fleet overview shows every kecamatan of the kabupaten: all values selected
            values[var_name] = grafana_multi(sorted(offered)) if var_name == "kecamatan" else wanted
        else:
            values[var_name] = wanted
    return values
