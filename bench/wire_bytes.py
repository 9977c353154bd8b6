"""2. Bytes on the wire per kit per day, counted at the agent's socket, versus a JSON-every-10-s baseline.

Each agent (a SimFleet kit with every probe, default settings except the time scale below) talks
to Mosquitto through a counting proxy (bench/proxy.py) that counts both directions: MQTT bytes, and
the TCP segments the kernel sent and received on that connection (TCP_INFO), so the IP-level
figure is bytes + 52 bytes of IPv4/TCP header (with timestamps) per segment. Link-layer framing
is not counted.

Time scale: the run is 12x faster than a real day. Heartbeat 5 s, keepalive 10 s and
identity_refresh 75 s stand for the defaults of 60 s, 120 s and 900 s (the same packets per
heartbeat, pings included, and device identities in full in one report of 15, the others pointing
back with idref), and the baseline publishes every 10/12 s with a 5 s keepalive for "every 10 s,
keepalive 60 s"; it sends every reading in full, identities included. The steady window is one
identity refresh period (15 heartbeats), so it holds one report with the identities in full. A day
is then extrapolated as: steady traffic x 86400 / (12 x window) + change reports x their measured
cost + connects x their measured cost (the numbers assumed per day are stated with the figures).

Device probes run every 2 s (not scaled: it is what bounds the change latency); the UPS, host and
link probes at the (scaled) heartbeat. The scenario's changes: the fingerprint reader is
unplugged and replugged a few times; each change is timed from the sysfs change to the report's
arrival at a subscriber on the broker.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import wire
from bench.common import Ctx, Figure, boot_id, full_report, median, wait_for
from bench.proxy import IP_TCP_HEADER, CountingProxy, diff
from collector.devbroker import Mosquitto
from agent.config import BrokerConfig
from collector.simfleet import SimFleet, SimKit

NAME = "wire"
TITLE = "Bytes on the wire"
SCALE = 12
HEARTBEAT = 60 // SCALE
KEEPALIVE = 60 // SCALE  # the baseline's
AGENT_KEEPALIVE = msgspec.convert({"url": "mqtt://x"}, BrokerConfig).keepalive // SCALE  # the agent's default
IDENTITY_REFRESH = 900 // SCALE  # the agent's default identity_refresh, scaled
DEVICE_INTERVAL = 2.0
BASELINE_PERIOD = 10 / SCALE
CHANGES_PER_DAY = 24  # assumed: e.g. 6 devices unplugged and replugged, and 6 link drops and returns, a day
CONNECTS_PER_DAY = 2  # assumed: the PC is switched on each morning, plus one broken connection
DAY = 86400


class Subscriber:
    """Every message on ektp/v1/#, with its arrival time."""

    def __init__(self, broker: Mosquitto, ca: str | None = None):
        self.messages: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        if ca:
            self.client.tls_set(ca_certs=ca)
        self.client.on_connect = lambda c, *a: c.subscribe("ektp/v1/#", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("subscriber could not subscribe")

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((time.monotonic(), msg.topic, bytes(msg.payload)))

    def reports(self, kec: str, since: float = 0.0) -> list[tuple[float, wire.Report]]:
        with self.lock:
            items = [(t, topic, p) for t, topic, p in self.messages if t >= since]
        out = []
        for t, topic, payload in items:
            parts = topic.split("/")
            if parts[3] == kec and parts[-1] == "report":
                out.append((t, wire.decode_report(payload)))
        return out

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


class ConnectWatch:
    """Takes a snapshot of a connection when its setup is over: the birth's PUBACK (agent), the
    CONNACK (baseline); on TLS the matching application record from the broker."""

    def __init__(self, proxy: CountingProxy, downstream_records: int):
        self.needed = downstream_records
        self.seen = 0
        self.snapshot: dict | None = None
        proxy.listeners.append(self)

    def __call__(self, conn, packet) -> None:
        if self.snapshot is not None or packet.up:
            return
        if packet.kind in ("CONNACK", "PUBACK", "tls_application_data"):
            self.seen += 1
            if self.seen >= self.needed:
                seg_out, seg_in = conn.segs()
                handshake = sum(p.size for p in conn.packets if p.kind.startswith("tls_") and
                                p.kind != "tls_application_data")
                payload = conn.bytes_up + conn.bytes_down
                self.snapshot = {"payload": payload, "segments": seg_out + seg_in, "tls_handshake": handshake,
                                 "ip": payload + IP_TCP_HEADER * (seg_out + seg_in)}


class Baseline:
    """A small paho client (MQTT 3.1.1, as Telegraf) publishing the readings as JSON at QoS 0."""

    def __init__(self, proxy: CountingProxy, readings, ca: str | None = None):
        self.readings = readings  # callable returning the current report
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311,
                                  client_id=f"baseline-{proxy.port}")
        if ca:
            self.client.tls_set(ca_certs=ca)
        self.stop = threading.Event()
        self.sent = 0
        self.client.connect("127.0.0.1", proxy.port, keepalive=KEEPALIVE)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        topic = wire.topic(wire.KitId("sintang", "baseline", "kit-1"), "report")
        next_at = time.monotonic()
        while not self.stop.is_set():
            report = self.readings()
            self.client.publish(topic, wire.encode(report, compress=False), qos=0)
            self.sent += 1
            next_at += BASELINE_PERIOD
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()


def configure(kit: SimKit, url: str, tls_ca: str | None, compress: bool, link_port: int,
              keepalive: int = AGENT_KEEPALIVE) -> None:
    path = kit.write_config(url, heartbeat=HEARTBEAT, interval=DEVICE_INTERVAL)
    config = yaml.safe_load(path.read_text())
    config["broker"] = {"url": url, "keepalive": keepalive, "compress": compress}  # will_delay etc.: defaults
    config["identity_refresh"] = IDENTITY_REFRESH
    if tls_ca:
        config["broker"]["tls"] = {"ca": tls_ca}
    probes = config["probes"]
    probes["ups"].update(interval=HEARTBEAT, timeout=HEARTBEAT)
    probes["host"].update(interval=HEARTBEAT)
    # the link probe at its defaults (3 TCP attempts per run), at the heartbeat, through its own proxy
    probes["link"] = {"interval": HEARTBEAT, "timeout": HEARTBEAT,
                      "targets": {"district": {"host": "127.0.0.1", "port": link_port}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def one_run(ctx: Ctx, plain: Mosquitto, tls: Mosquitto | None, ca: str | None, steady: float, changes: int,
            spacing: float) -> dict:
    fleet = SimFleet(ctx.tmp("fleet"))
    subs = {"plain": Subscriber(plain)}
    if tls:
        subs["tls"] = Subscriber(tls, ca)
    # name, broker, compress, keepalive
    setups = [("agent", "plain", True, AGENT_KEEPALIVE), ("agent_json", "plain", False, AGENT_KEEPALIVE),
              ("agent_ka60", "plain", True, 60 // SCALE)] + ([("agent_tls", "tls", True, AGENT_KEEPALIVE)] if tls else [])
    agents: dict[str, dict] = {}
    baselines: dict[str, dict] = {}
    try:
        for name, broker_kind, compress, keepalive in setups:
            broker = plain if broker_kind == "plain" else tls
            kit = fleet.add("sintang", name.replace("_", "-"), "kit-1")
            proxy = CountingProxy(broker.port, tls=broker_kind == "tls")
            link_proxy = CountingProxy(kit.district.port)
            watch = ConnectWatch(proxy, 2)
            configure(kit, proxy.url(), ca if broker_kind == "tls" else None, compress, link_proxy.port, keepalive)
            kit.start()
            agents[name] = {"kit": kit, "proxy": proxy, "link": link_proxy, "watch": watch, "sub": subs[broker_kind],
                            "kec": name.replace("_", "-")}
        latest = {"report": full_report(wire.KitId("sintang", "baseline", "kit-1"), 1, time.time(), boot_id(1))}

        def readings():
            got = subs["plain"].reports("agent")
            if got:
                report = got[-1][1]
                latest["report"] = wire.Report(v=1, kab="sintang", kec="baseline", kit="kit-1", ts=round(time.time(), 3),
                                               boot=report.boot, seq=report.seq, hb=10, p=with_identities(got),
                                               q=report.q)
            return latest["report"]

        for name, broker in [("baseline", plain)] + ([("baseline_tls", tls)] if tls else []):
            proxy = CountingProxy(broker.port, tls=name.endswith("tls"))
            watch = ConnectWatch(proxy, 1)
            baselines[name] = {"proxy": proxy, "watch": watch,
                               "client": Baseline(proxy, readings, ca if name.endswith("tls") else None)}
        # warm-up: two reports from every agent (quick: one)
        for name, a in agents.items():
            wait_for(lambda: len(a["sub"].reports(a["kec"])) >= (1 if ctx.quick else 2), 30, 0.1,
                     f"the first reports from {name}")
        everyone = {**agents, **baselines}
        # steady window: heartbeats only
        start = {n: x["proxy"].totals() for n, x in everyone.items()}
        link_start = {n: a["link"].totals() for n, a in agents.items()}
        t0 = time.monotonic()
        time.sleep(steady)
        end = {n: x["proxy"].totals() for n, x in everyone.items()}
        link_end = {n: a["link"].totals() for n, a in agents.items()}
        t1 = time.monotonic()
        steady_reports = {n: len([r for t, r in a["sub"].reports(a["kec"], t0) if t < t1]) for n, a in agents.items()}
        # changes: unplug and replug the fingerprint reader
        latencies: dict[str, list[float]] = {n: [] for n in agents}
        c0 = {n: a["proxy"].totals() for n, a in agents.items()}
        tc0 = time.monotonic()
        for i in range(changes):
            unplug = i % 2 == 0
            at = time.monotonic()
            for a in agents.values():
                if unplug:
                    a["kit"].devices.change(unplug=("fingerprint",))
                else:
                    a["kit"].devices.change(plug=("fingerprint",))
            want = "missing" if unplug else "ok"
            for name, a in agents.items():
                def arrived():
                    for t, r in a["sub"].reports(a["kec"], at):
                        entry = r.p.get("fingerprint")
                        if entry is not None and entry.s == want:
                            return t
                    return None

                latencies[name].append(wait_for(arrived, 20, 0.01, f"{name}'s change report") - at)
            time.sleep(max(0.0, at + spacing - time.monotonic()))
        c1 = {n: a["proxy"].totals() for n, a in agents.items()}
        tc1 = time.monotonic()
        change_reports = {n: len([1 for t, r in a["sub"].reports(a["kec"], tc0) if t < tc1]) for n, a in agents.items()}
        out = {}
        for name, x in everyone.items():
            d = diff(start[name], end[name])
            connect = x["watch"].snapshot or {}
            row = {"steady_seconds": round(d["at"], 2), "steady": d, "connect": connect,
                   "steady_ip_per_day": d["ip"] * DAY / (SCALE * d["at"]),
                   "steady_payload_per_day": d["payload"] * DAY / (SCALE * d["at"]),
                   "packets": _packet_counts(x["proxy"], t0, t1)}
            if name in agents:
                dc = diff(c0[name], c1[name])
                row["steady_reports"] = steady_reports[name]
                row["change"] = dc
                row["change_reports"] = change_reports[name]
                row["ip_per_change_report"] = dc["ip"] / max(1, change_reports[name])
                row["payload_per_change_report"] = dc["payload"] / max(1, change_reports[name])
                row["latencies"] = latencies[name]
                ld = diff(link_start[name], link_end[name])
                row["link_probe_ip_per_day"] = ld["ip"] * DAY / (SCALE * ld["at"])
                row["link_probe_connections"] = len(x["link"].conns)
                in_window = [r for t, r in x["sub"].reports(x["kec"], t0) if t < t1]
                sizes = [(len(wire.encode(r, compress=name != "agent_json")), _has_idref(r)) for r in in_window]
                row["report_payload_bytes"] = [n for n, _ in sizes][:3]
                row["report_payload_idref"] = [n for n, idref in sizes if idref]  # identities left out
                row["report_payload_full"] = [n for n, idref in sizes if not idref]  # identities in full
                row["day_ip"] = (row["steady_ip_per_day"] + CHANGES_PER_DAY * row["ip_per_change_report"]
                                 + CONNECTS_PER_DAY * connect.get("ip", 0))
                row["day_payload"] = (row["steady_payload_per_day"] + CHANGES_PER_DAY * row["payload_per_change_report"]
                                      + CONNECTS_PER_DAY * connect.get("payload", 0))
            else:
                row["sent"] = x["client"].sent
                row["day_ip"] = row["steady_ip_per_day"] + CONNECTS_PER_DAY * connect.get("ip", 0)
                row["day_payload"] = row["steady_payload_per_day"] + CONNECTS_PER_DAY * connect.get("payload", 0)
            out[name] = row
        return out
    finally:
        for b in baselines.values():
            b["client"].close()
            b["proxy"].close()
        fleet.close()
        for a in agents.values():
            a["proxy"].close()
            a["link"].close()
        for s in subs.values():
            s.close()


def _payload_words(row: dict) -> str:
    """The report payloads of the steady window: identities by idref and in full."""
    idref, full = row.get("report_payload_idref", []), row.get("report_payload_full", [])
    parts = []
    if idref:
        parts.append(f"report payload {median(idref):.0f} B with identities by idref")
    if full:
        parts.append(f"{median(full):.0f} B with them in full")
    return (", ".join(parts) or "report payload ?") + f" ({len(full)} of {len(idref) + len(full)} steady reports in full)"


def _has_idref(report: wire.Report) -> bool:
    return any(getattr(entry, "idref", None) is not None for entry in report.p.values())


def with_identities(reports: list[tuple[float, wire.Report]]) -> dict[str, wire.Entry]:
    """The last report's entries with each idref replaced by the identity it points to (one agent,
    one boot), as a naive exporter would send them: everything, every time."""
    full: dict[tuple[str, int], dict] = {}  # (probe, seq) -> identity sent in full
    for _, report in reports:
        for name, entry in report.p.items():
            fields = wire.IDENTITY_FIELDS.get(type(entry))
            if fields and entry.idref is None:
                full[(name, report.seq)] = {f: getattr(entry, f) for f in fields}
    last = reports[-1][1]
    return {name: msgspec.structs.replace(entry, idref=None, **full.get((name, entry.idref), {}))
            if getattr(entry, "idref", None) is not None else entry for name, entry in last.p.items()}


def _packet_counts(proxy: CountingProxy, since: float, until: float) -> dict:
    counts: dict[str, list[int]] = {}
    for p in proxy.packets(since, until):
        key = f"{'up' if p.up else 'down'} {p.kind}" + (" " + p.topic.rsplit("/", 1)[-1] if p.topic else "")
        entry = counts.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += p.size
    return {k: {"count": n, "bytes": b} for k, (n, b) in sorted(counts.items())}


def make_pki(directory: Path) -> tuple[str, str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(paths[0])
    cert.cert_chain_pems[0].write_to_path(paths[1])
    cert.private_key_pem.write_to_path(paths[2])
    return tuple(str(p) for p in paths)


def run(ctx: Ctx) -> list[Figure]:
    # steady window: one identity refresh period (15 heartbeats), so one report has the identities in full
    steady, changes, spacing = (HEARTBEAT, 2, 3.0) if ctx.quick else (IDENTITY_REFRESH, 6, 3.5)
    pki_dir = ctx.tmp("pki")
    try:
        ca, cert, key = make_pki(pki_dir)
    except ImportError:
        ca = None
        ctx.note("trustme is not installed: no TLS figures")
    runs = []
    with Mosquitto(ctx.tmp("broker")) as plain:
        tls = Mosquitto(ctx.tmp("broker-tls"), tls=(ca, cert, key)).start() if ca else None
        try:
            for i in range(ctx.runs):
                runs.append(one_run(ctx, plain, tls, ca, steady, changes, spacing))
                ctx.log("  run {}: ".format(i + 1) + ", ".join(f"{n} {r['day_ip'] / 1e6:.3f} MB/day"
                                                             for n, r in runs[-1].items()))
        finally:
            if tls:
                tls.stop()

    def med(name, fn):
        return median([fn(r[name]) for r in runs if name in r])

    def vals(name, fn, digits=3):
        return [round(fn(r[name]), digits) for r in runs if name in r]

    first = runs[0]
    figures = []
    base = med("baseline", lambda r: r["day_ip"] / 1e6)
    base_tls = med("baseline_tls", lambda r: r["day_ip"] / 1e6) if "baseline_tls" in first else None
    assumption = (f"day = steady x {DAY}/(12 x window) + {CHANGES_PER_DAY} change reports + {CONNECTS_PER_DAY} connects "
                  f"(assumed per day)")
    for name, label, peer in [("agent", "Agent, defaults (zlib, QoS 1, 60 s heartbeat), plain MQTT", base),
                              ("agent_tls", "Agent, defaults, over TLS 1.2", base_tls)]:
        if name not in first:
            continue
        day = med(name, lambda r: r["day_ip"] / 1e6)
        steady_mb = med(name, lambda r: r["steady_ip_per_day"] / 1e6)
        per_report = med(name, lambda r: r["steady"]["ip"] / max(1, r["steady_reports"]))
        payload_day = med(name, lambda r: r["day_payload"] / 1e6)
        payloads = _payload_words(first[name])
        why = ""
        if day > 1.0:
            r = first[name]
            why = (f"measured: {per_report:.0f} B per heartbeat report at IP level "
                   f"({r['steady']['payload'] / max(1, r['steady_reports']):.0f} B MQTT"
                   f"{' incl. TLS' if name.endswith('tls') else ''} + "
                   f"{IP_TCP_HEADER * r['steady']['segments'] / max(1, r['steady_reports']):.0f} B TCP/IP headers, "
                   f"{r['steady']['segments'] / max(1, r['steady_reports']):.1f} segments); "
                   f"{payloads}; 1440 heartbeats alone = {steady_mb:.2f} MB")
        figures.append(Figure(f"{name}_mb_per_day", label + ", per kit per day (IP level)", day, "MB", "<= 1 MB",
                              day <= 1.0, f"JSON every 10 s at QoS 0: {peer:.2f} MB" if peer else "",
                              vals(name, lambda r: r["day_ip"] / 1e6), why,
                              f"{assumption}; heartbeats alone {steady_mb:.3f} MB, MQTT bytes only (no TCP/IP) "
                              f"{payload_day:.3f} MB; {per_report:.0f} B per heartbeat report incl. PUBACK, "
                              f"pings and TCP/IP headers; {payloads}"))
    for name, label in [("agent_json", "Agent with compress: false (plain JSON, QoS 1, 60 s)"),
                        ("agent_ka60", "Agent with keepalive: 60 (the default before: a ping every 60 s)"),
                        ("baseline", "Baseline: same readings as JSON every 10 s, QoS 0 (peer)"),
                        ("baseline_tls", "Baseline over TLS (peer)")]:
        if name in first:
            figures.append(Figure(f"{name}_mb_per_day", label + ", per day (IP level)",
                                  med(name, lambda r: r["day_ip"] / 1e6), "MB", runs=vals(name, lambda r: r["day_ip"] / 1e6),
                                  note=f"MQTT bytes only {med(name, lambda r: r['day_payload'] / 1e6):.3f} MB"
                                       + (f"; {first[name]['sent']} messages sent in the run" if "sent" in first[name]
                                          else "")))
    for name in ("agent", "agent_tls"):
        if name in first:
            connect = med(name, lambda r: r["connect"].get("ip", 0))
            hs = med(name, lambda r: r["connect"].get("tls_handshake", 0))
            figures.append(Figure(f"{name}_connect_bytes", f"{'TLS ' if name.endswith('tls') else ''}connect cost "
                                  "(TCP+MQTT CONNECT..birth PUBACK)", connect, "B",
                                  runs=vals(name, lambda r: r["connect"].get("ip", 0), 0),
                                  note=f"TLS handshake records {hs:.0f} B" if hs else ""))
    all_latencies = [x for r in runs for x in r["agent"]["latencies"]]
    lat = median(all_latencies)
    worst = max(all_latencies)
    figures.append(Figure("change_latency_s", "Device change -> report at a subscriber (device probes every 2 s)",
                          lat, "s", "<= 5 s", worst <= 5.0, "", [round(x, 2) for x in all_latencies],
                          "" if worst <= 5.0 else f"worst {worst:.2f} s",
                          f"median of {len(all_latencies)} changes, worst {worst:.2f} s; at the example config's "
                          "defaults device probes run once per heartbeat (60 s), so a change can take up to 60 s: "
                          "the 5 s goal needs `interval: 2` on the device probes (costs CPU, see footprint, not bytes)"))
    link = med("agent", lambda r: r["link_probe_ip_per_day"] / 1e6)
    figures.append(Figure("link_probe_mb_per_day", "Link probe's own traffic (TCP connects to the district, default "
                          "3 per run, every 60 s), per day", link, "MB", runs=vals("agent", lambda r: r["link_probe_ip_per_day"] / 1e6),
                          note="not on the MQTT socket, so not in the figures above; counted by a proxy in front of "
                               "the district listener"))
    pings = {n: (first[n]["packets"].get("up PINGREQ", {}).get("count", 0), first[n].get("steady_reports", 0))
             for n in ("agent", "agent_ka60") if n in first}
    if pings:
        ctx.note("keepalive pings while reports flow: " + ", ".join(f"{n} {p} PINGREQ per {r} heartbeat reports"
                                                                     for n, (p, r) in pings.items())
                 + ": paho-mqtt 2.2 sends a PINGREQ every keepalive even when it publishes more often (its "
                   "_packet_write returns before updating _last_msg_out once its queue is empty), so each ping "
                   "(PINGREQ, PINGRESP and their TCP segments) is paid on top of the reports")
    for name, row in first.items():
        ctx.note(f"{name}: steady window {row['steady_seconds']} s = {row['steady_seconds'] * SCALE / 60:.0f} scaled "
                 f"minutes; packets " + "; ".join(f"{k} x{v['count']} ({v['bytes']} B)" for k, v in row["packets"].items()))
    ctx.extra["runs"] = runs
    ctx.extra["assumptions"] = {"scale": SCALE, "heartbeat": HEARTBEAT, "keepalive": AGENT_KEEPALIVE, "baseline_keepalive": KEEPALIVE,
                                "changes_per_day": CHANGES_PER_DAY, "connects_per_day": CONNECTS_PER_DAY,
                                "ip_tcp_header_bytes_per_segment": IP_TCP_HEADER}
    return figures
