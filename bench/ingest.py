"""3. Collector ingest throughput through a real Mosquitto, versus mqtt2prometheus on the same stream.

Kits: 5,000 kit topics (quick: 500). Stream: full-kit reports (bench.common.full_report, about
1.5 kB of JSON or 0.5 kB zlib), encoded beforehand with wire.encode, round-robin over the kits
with increasing sequence numbers, so every message is a new report to the collector.

Each run gets a fresh Mosquitto with the district broker's queue limits and a fresh consumer:
- ours: `python -m collector run -c CFG` (its own process, fresh SQLite store);
- peer: Debian's prometheus-mqtt-exporter (mqtt2prometheus), subscribed to the same report topics,
  mapping 28 fields of the same JSON (sequence, times, each device's state, UPS, link, host).
Both first receive one report per kit (ours also each kit's status), untimed. Then one publisher
process (bench/publisher.py, pre-built frames: it uses little CPU so that the consumer and the
broker get the 2 cores) sends the flood at QoS 0 or QoS 1 (the consumer's subscription QoS
matches: the collector always subscribes at QoS 1, so its delivered QoS is the publisher's).

Method, the same for both: the consumer's CPU time (/proc/<pid>/stat) is sampled every 50 ms; the
flood is over when the publisher has finished and the consumer has been idle (< 10 % of a core)
for 0.5 s; the end is the last busy sample. The consumer's own counter then says how many
messages it processed (ours: ektp_collector_messages_received_total; mqtt2prometheus: the sum of
received_messages). Rate = processed / (end - first publish). /metrics is not polled during the
flood: a scrape of 5,000 changing kits would compete for the collector's CPU.
"""

from __future__ import annotations

import json
import marshal
import os
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from agent import wire
from bench.common import (
    PYTHON,
    ROOT,
    CollectorProcess,
    Ctx,
    DistrictMosquitto,
    Figure,
    boot_id,
    cpu_seconds,
    find_tool,
    full_report,
    http_get,
    kit_ids,
    median,
    memory,
    package_version,
    status_online,
    stop_process,
    wait_for,
)
from collector.devbroker import free_port

NAME = "ingest"
TITLE = "Collector ingest throughput"
GOAL_FLOOR = 20_000
BARE = {"paho": "count", "paho+decode": "decode"}  # bench/baresub.py: the floor under the collector
M2P_METRICS = [
    ("seq", "seq", None), ("ts", "ts", None), ("hb", "hb", None),
    *[(f"{d}_up", f"p.{d}.s", "state") for d in ("fingerprint", "iris", "camera", "signature_pad", "card_reader")],
    *[(f"ups_{f}", f"p.ups.{f}", None) for f in ("on_batt", "batt_low", "load", "in_v", "out_v", "batt_v", "in_hz",
                                                  "temp", "charge")],
    ("ups_up", "p.ups.s", "state"),
    *[(f"link_{f}", f"p.link.targets.district.{f}", None) for f in ("up", "rtt", "sent", "recv")],
    ("link_ok", "p.link.s", "state"),
    *[(f"host_{f}", f"p.host.{f}", None) for f in ("cpu", "mem_avail", "mem_total", "boot")],
    ("host_ok", "p.host.s", "state"),
]


# -- the stream -------------------------------------------------------------------------------


def _chunk(args) -> list[tuple[str, bytes]]:
    start, end, kits, per_kit_seq0, base_ts, compress = args
    ids = kit_ids(kits)
    out = []
    for i in range(start, end):
        k = i % kits
        seq = per_kit_seq0 + i // kits
        report = full_report(ids[k], seq, base_ts + seq * 60.0, boot_id(k), k)
        out.append((wire.topic(ids[k], "report"), wire.encode(report, compress=compress)))
    return out


def make_stream(path: Path, kits: int, total: int, compress: bool) -> tuple[Path, Path, Path]:
    """Writes three marshal files: statuses (one per kit), warm-up (one report per kit) and the
    flood (`total` reports). Reports are stamped in the past, one heartbeat apart."""
    base_ts = time.time() - (total // kits + 2) * 60.0
    ids = kit_ids(kits)
    statuses = [(wire.topic(k, "status"), wire.encode(status_online(boot_id(i), time.time())))
                for i, k in enumerate(ids)]
    workers = min(4, os.cpu_count() or 1)
    all_count = kits + total
    step = max(1, -(-all_count // (workers * 4)))
    jobs = [(s, min(all_count, s + step), kits, 1, base_ts, compress) for s in range(0, all_count, step)]
    with ProcessPoolExecutor(workers) as pool:
        messages = [m for chunk in pool.map(_chunk, jobs) for m in chunk]
    files = path / "statuses.m", path / "warmup.m", path / "flood.m"
    files[0].write_bytes(marshal.dumps(statuses))
    files[1].write_bytes(marshal.dumps(messages[:kits]))
    files[2].write_bytes(marshal.dumps(messages[kits:]))
    return files


class Publisher:
    def __init__(self, data: Path, broker, qos: int, mode: str = "raw"):
        self.proc = subprocess.Popen([PYTHON, "-m", "bench.publisher", str(data), broker.host, str(broker.port),
                                      str(qos), mode], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"publisher did not start: {line}")

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 600) -> dict:
        line = self.proc.stdout.readline()
        self.proc.wait(timeout)
        result = json.loads(line) if line.strip() else {"error": "no result"}
        if "error" in result:
            raise RuntimeError(f"publisher: {result['error']}")
        return result


def publish(data: Path, broker, qos: int) -> dict:
    pub = Publisher(data, broker, qos)
    pub.go()
    return pub.result()


# -- consumers --------------------------------------------------------------------------------


class Ours:
    name = "collector"
    client_id = "bench-collector"  # bench.common.write_collector_config

    def __init__(self, workdir: Path, broker, kits: int):
        self.kits = kits
        self.proc = CollectorProcess(workdir, broker, "collector",
                                     fleet={"max_kits": max(20_000, kits), "required_devices":
                                            ["fingerprint", "iris", "camera", "signature_pad"]}).start()
        self.pid = self.proc.pid

    def count(self) -> float:
        return self.proc.received()

    def stop(self) -> None:
        self.proc.stop()


class Peer:
    name = "mqtt2prometheus"

    def __init__(self, workdir: Path, broker, kits: int, qos: int):
        exe = find_tool("prometheus-mqtt-exporter")
        if exe is None:
            raise RuntimeError("prometheus-mqtt-exporter is not installed (apt-get install prometheus-mqtt-exporter)")
        self.port = free_port()
        self.client_id = f"m2p-{self.port}"
        metrics = []
        for prom, path, kind in M2P_METRICS:
            metric = {"prom_name": f"kit_{prom}", "mqtt_name": path, "help": path, "type": "gauge"}
            if kind == "state":
                metric["string_value_mapping"] = {"map": {"ok": 1, "warn": 1, "missing": 0, "error": 0},
                                                  "error_value": 0}
            metrics.append(metric)
        config = {
            "mqtt": {"server": f"tcp://{broker.host}:{broker.port}", "client_id": self.client_id,
                     "topic_path": wire.subscription(kind="report"),
                     "device_id_regex": r"ektp/v1/(?P<deviceid>[^/]+/[^/]+/[^/]+)/report", "qos": qos},
            "cache": {"timeout": "24h"},
            "json_parsing": {"separator": "."},
            "metrics": metrics,
        }
        path = workdir / "mqtt2prometheus.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        with open(workdir / "mqtt2prometheus.log", "ab") as log:
            self.proc = subprocess.Popen([exe, "-config", str(path), "-listen-address", "127.0.0.1",
                                          "-listen-port", str(self.port), "-log-level", "warn"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{self.port}/metrics"

        def connected():
            if self.proc.poll() is not None:
                raise RuntimeError("mqtt2prometheus exited: " + (workdir / "mqtt2prometheus.log").read_text()[-1500:])
            try:
                return b"mqtt2prometheus_connected 1" in http_get(self.url, 5)[1]
            except OSError:
                return False

        wait_for(connected, 20, 0.1, "mqtt2prometheus to connect")
        time.sleep(0.3)  # its SUBSCRIBE follows the CONNACK

    def count(self) -> float:
        text = http_get(self.url)[1].decode()
        return sum(float(m.group(1)) for m in re.finditer(r'^received_messages\{status="success"[^}]*\} (\S+)$',
                                                            text, re.M))

    def stop(self) -> None:
        stop_process(self.proc)


class Bare:
    """bench/baresub.py: paho-mqtt with the collector's settings and nothing behind it."""

    def __init__(self, workdir: Path, broker, mode: str):
        self.name = f"paho ({mode})"
        self.client_id = f"bench-baresub-{broker.port}"
        with open(workdir / "baresub.log", "ab") as log:
            self.proc = subprocess.Popen([PYTHON, "-m", "bench.baresub", broker.host, str(broker.port), mode],
                                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True)
        self.pid = self.proc.pid
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"bench.baresub did not start: {line or (workdir / 'baresub.log').read_text()[-1500:]}")

    def count(self) -> float:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def stop(self) -> None:
        stop_process(self.proc)


def _watch_until_idle(pid: int, publisher: Publisher, timeout: float = 600) -> tuple[float, float, dict]:
    """Samples the consumer's CPU every 50 ms until the publisher is done and the consumer has
    been idle for 0.5 s; returns (end of the last busy sample, CPU seconds at it, publisher result)."""
    samples = [(time.monotonic(), cpu_seconds(pid))]
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(publisher.result(timeout)), daemon=True)
    waiter.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        samples.append((time.monotonic(), cpu_seconds(pid)))
        if waiter.is_alive() or len(samples) < 12:
            continue
        t_old, c_old = samples[-11]
        if (samples[-1][1] - c_old) < 0.10 * (samples[-1][0] - t_old):
            break
    waiter.join(timeout)
    if "start" not in result:
        raise RuntimeError("the publisher did not finish")
    last_busy = samples[0]
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if c1 - c0 > 0.5 * (t1 - t0):
            last_busy = (t1, c1)
    return last_busy[0], last_busy[1], result


def one_run(ctx: Ctx, consumer_kind: str, qos: int, files: tuple[Path, Path, Path], kits: int, total: int,
            profile: Path | None = None) -> dict:
    workdir = ctx.tmp(f"{consumer_kind}-q{qos}")
    broker = DistrictMosquitto(workdir / "broker").start()
    consumer = None
    spy = None
    try:
        if consumer_kind == "ours":
            consumer = Ours(workdir, broker, kits)
            publish(files[0], broker, 1)
            publish(files[1], broker, 1)
            expected_warm = 2 * kits
        elif consumer_kind in BARE:
            consumer = Bare(workdir, broker, BARE[consumer_kind])
            publish(files[1], broker, 1)
            expected_warm = kits
        else:
            consumer = Peer(workdir, broker, kits, qos)
            publish(files[1], broker, 1)
            expected_warm = kits
        wait_for(lambda: consumer.count() >= expected_warm, 120, 0.5, "the warm-up messages")
        time.sleep(0.5)
        before = consumer.count()
        pub = Publisher(files[2], broker, qos)
        if profile is not None:
            spy = subprocess.Popen([str(find_py_spy()), "record", "--pid", str(consumer.pid), "--rate", "100",
                                    "--duration", "20", "--format", "raw", "--threads", "--nonblocking",
                                    "-o", str(profile)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        cpu0, mosq0 = cpu_seconds(consumer.pid), cpu_seconds(broker.proc.pid)
        pub.go()
        end, cpu_end, result = _watch_until_idle(consumer.pid, pub)
        if spy is not None:
            if spy.poll() is None:
                spy.send_signal(2)
            spy.wait(60)
        processed = consumer.count() - before
        seconds = end - result["start"]
        # the broker's log says whether the consumer lost its connection during the flood
        drops = [line for line in broker.log().splitlines() if consumer.client_id in line and
                 any(w in line for w in ("closed its connection", "disconnected", "exceeded timeout"))]
        mem = memory(consumer.pid)
        # a report delivered twice (a QoS 1 redelivery after a reconnect) is counted by the consumer
        # but is not a new report: the rate counts each report once
        unique = min(processed, result["count"])
        return {"consumer": consumer_kind, "qos": qos, "sent": result["count"], "processed": processed,
                "duplicates": max(0, processed - result["count"]), "seconds": round(seconds, 3),
                "rate": unique / seconds,
                "publisher_rate": result["count"] / (result["end"] - result["start"]),
                "cpu_us_per_message": (cpu_end - cpu0) / max(1, processed) * 1e6,
                "broker_cpu_us_per_message": (cpu_seconds(broker.proc.pid) - mosq0) / max(1, processed) * 1e6,
                "rss_mb": round(mem["rss"] / 1e6, 1), "disconnects": len(drops), "disconnect_log": drops[:3]}
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if consumer is not None:
            consumer.stop()
        broker.stop()


def find_py_spy() -> Path | None:
    for candidate in (os.environ.get("PY_SPY"), shutil.which("py-spy"), "/tmp/pyspy/bin/py-spy"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def summarize_profile(path: Path, top: int = 12) -> dict:
    """Reads py-spy's collapsed stacks: share of samples by thread, by function (inclusive) and
    by leaf function (self)."""
    threads: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    leaf: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        total += n
        threads[thread] = threads.get(thread, 0) + n
        seen = set()
        for frame in frames[1:]:
            name = re.sub(r"\s*\((.*?)/([^/]+\.py):\d+\)", r" (\2)", frame).strip()
            if name not in seen:
                inclusive[name] = inclusive.get(name, 0) + n
                seen.add(name)
        if len(frames) > 1:
            name = re.sub(r"\s*\((.*?)/([^/]+\.py):\d+\)", r" (\2)", frames[-1]).strip()
            leaf[name] = leaf.get(name, 0) + n

    def share(d):
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda x: -x[1])[:top]]

    return {"samples": total, "threads": share(threads), "inclusive": share(inclusive), "self": share(leaf)}


def _lost(rows: list[dict]) -> str:
    lost = [int(r["sent"] - r["processed"]) for r in rows]
    return f"; messages lost per run: {lost} of {rows[0]['sent']:,}" if any(lost) else ""


def _disconnects(rows: list[dict]) -> str:
    n = [r.get("disconnects", 0) for r in rows]
    if not any(n):
        return ""
    lost = any(r["sent"] > r["processed"] for r in rows)
    dups = [int(r.get("duplicates", 0)) for r in rows]
    logged = next((r["disconnect_log"][0] for r in rows if r.get("disconnect_log")), "")
    return (f"; the broker logged the consumer's connection ending during the flood, per run: {n}"
            + (f" ('{logged.split(': ', 1)[-1]}')" if logged else "")
            + ("; what was queued for it at QoS 0 was lost" if lost else "; nothing was lost (QoS 1, persistent "
               "session: the broker sent the rest after the reconnect)")
            + (f"; messages counted twice (redelivered after the reconnect, not in the rate) per run: {dups}"
               if any(dups) else ""))


def run(ctx: Ctx) -> list[Figure]:
    kits, total = (500, 5_000) if ctx.quick else (5_000, 200_000)
    if find_tool("prometheus-mqtt-exporter") is None:
        raise RuntimeError("prometheus-mqtt-exporter is not installed (apt-get install prometheus-mqtt-exporter)")
    t = time.monotonic()
    streams = {"json": make_stream(ctx.tmp("stream-json"), kits, total, False),
               "zlib": make_stream(ctx.tmp("stream-zlib"), kits, total, True)}
    sizes = {k: len(marshal.loads(v[2].read_bytes())[0][1]) for k, v in streams.items()}
    ctx.log(f"  streams built in {time.monotonic() - t:.1f} s: {total:,} reports over {kits:,} kits, "
            f"{sizes['json']} B JSON / {sizes['zlib']} B zlib each")
    # zlib at QoS 1 is what agents send; the peer cannot read zlib, so it gets the JSON stream
    plan = [("ours", "json", 0), ("ours", "json", 1), ("ours", "zlib", 1), ("peer", "json", 0), ("peer", "json", 1),
            ("paho", "zlib", 1), ("paho+decode", "zlib", 1)]
    if ctx.quick:  # keeps `make test` short: one of each consumer and encoding
        plan = [("ours", "json", 1), ("ours", "zlib", 1), ("peer", "json", 1), ("paho+decode", "zlib", 1)]
    results: dict[tuple, list[dict]] = {}
    for i in range(ctx.runs):
        for consumer, encoding, qos in plan:
            row = one_run(ctx, consumer, qos, streams[encoding], kits, total)
            row["encoding"] = encoding
            results.setdefault((consumer, encoding, qos), []).append(row)
            ctx.log(f"  run {i + 1} {consumer} {encoding} QoS {qos}: {row['rate']:,.0f} reports/s "
                    f"({row['processed']:,.0f}/{row['sent']:,} in {row['seconds']} s, "
                    f"{row['cpu_us_per_message']:.0f} us CPU/msg, publisher {row['publisher_rate']:,.0f}/s)")

    def med(key, field="rate"):
        return median([r[field] for r in results.get(key, [])])

    def runs_of(key):
        return [round(r["rate"]) for r in results.get(key, [])]

    figures = []
    version = (package_version("prometheus-mqtt-exporter") or "?").split("-")[0]
    floor = ""
    if ("paho", "zlib", 1) in results:
        floor = (f"; a bare paho subscriber with the collector's MQTT settings and nothing behind it reaches "
                 f"{med(('paho', 'zlib', 1)):,.0f}/s on the same stream ({med(('paho', 'zlib', 1), 'cpu_us_per_message'):.0f}"
                 f" us/msg), {med(('paho+decode', 'zlib', 1)):,.0f}/s when it also decodes each report")
    profile_wanted = False
    for qos in (0, 1):
        if ("peer", "json", qos) not in results:
            continue
        peer = med(("peer", "json", qos))
        for encoding in ("json", "zlib"):
            key = ("ours", encoding, qos)
            if key not in results:
                continue
            rate = med(key)
            goal = max(peer, GOAL_FLOOR)
            ok = rate >= goal
            lost = median([r["sent"] - r["processed"] for r in results[key]])
            why = ""
            if not ok:
                profile_wanted = True
                why = (f"measured {med(key, 'cpu_us_per_message'):.0f} us of collector CPU per message "
                       f"(peer {med(('peer', 'json', qos), 'cpu_us_per_message'):.0f} us){floor}; "
                       f"see the profile note")
            figures.append(Figure(
                f"collector_{encoding}_qos{qos}_per_s",
                f"Collector, {'plain JSON' if encoding == 'json' else 'zlib'} reports, QoS {qos}", rate, "reports/s",
                f">= peer and >= {GOAL_FLOOR:,}/s", ok,
                f"mqtt2prometheus {version} (JSON): {peer:,.0f}/s", runs_of(key), why,
                f"{med(key, 'cpu_us_per_message'):.0f} us collector CPU and {med(key, 'broker_cpu_us_per_message'):.0f} "
                f"us mosquitto CPU per message; RSS after {med(key, 'rss_mb'):.0f} MB"
                + (f"; {lost:,.0f} messages lost" if lost else "")
                + _disconnects(results[key])))
        figures.append(Figure(f"peer_qos{qos}_per_s", f"mqtt2prometheus {version}, plain JSON, QoS {qos} (peer)", peer,
                              "reports/s", runs=runs_of(("peer", "json", qos)),
                              note=f"{med(('peer', 'json', qos), 'cpu_us_per_message'):.0f} us CPU per message; "
                                   f"RSS after {med(('peer', 'json', qos), 'rss_mb'):.0f} MB; CONTEXT.md: "
                                   + ("26.6k/s" if qos == 0 else "23.9k/s")
                                   + _lost(results[("peer", "json", qos)])
                                   + _disconnects(results[("peer", "json", qos)])))
    for kind, mode in BARE.items():
        key = (kind, "zlib", 1)
        if key in results:
            figures.append(Figure(
                f"floor_{mode}_per_s", "Floor: a bare paho-mqtt subscriber (MQTT 5, QoS 1, manual ack as the "
                f"collector), zlib, " + ("counting only" if mode == "count" else "decoding each report"),
                med(key), "reports/s", runs=runs_of(key),
                note=f"{med(key, 'cpu_us_per_message'):.0f} us CPU per message (bench/baresub.py); CONTEXT.md: "
                     "83k/s counting, 77k/s with typed decoding, for small reports at QoS 0 without manual acks"
                     + _lost(results[key]) + _disconnects(results[key])))
    ctx.note("method, the same for both consumers: rate = messages the consumer's own counter says it processed "
             "(collector: ektp_collector_messages_received_total; mqtt2prometheus: sum of received_messages) / time "
             "from the first publish to the consumer's last busy 50 ms CPU sample; the broker, the consumer and the "
             "publisher share the 2 cores")
    pub = median([r["publisher_rate"] for rows in results.values() for r in rows])
    ctx.note(f"the publisher sent at a median {pub:,.0f} messages/s (pre-built frames), faster than either consumer, "
             "so the broker held the backlog and the consumer set the pace")
    ctx.extra["runs"] = {f"{c}-{e}-q{q}": rows for (c, e, q), rows in results.items()}
    if profile_wanted and not ctx.quick:
        spy = find_py_spy()
        if spy is None:
            ctx.note("the collector missed its goal; install py-spy (pip install py-spy, or set PY_SPY) to profile it")
        else:
            out = ctx.workdir / "collector-profile.txt"
            row = one_run(ctx, "ours", 1, streams["json"], kits, total, profile=out)
            summary = summarize_profile(out)
            ctx.extra["profile"] = summary
            ctx.extra["profile_run"] = row
            us = med(("ours", "json", 1), "cpu_us_per_message") or row["cpu_us_per_message"]

            def cost(items, n):
                return ", ".join([f"{k} {v}% (~{v * us / 100:.0f} us)" for k, v in items
                                  if not k.startswith(("Thread.", "Thread._"))][:n])

            ctx.note(f"py-spy profile of the collector (plain JSON, QoS 1; first 20 s of a flood, {summary['samples']} "
                     f"samples at 100 Hz; us = share x the {us:.0f} us of CPU per message measured without py-spy): "
                     f"by thread " + ", ".join(f"{k.split(': ')[-1]} {v}%" for k, v in summary["threads"])
                     + "; inclusive: " + cost(summary["inclusive"], 12) + "; self: " + cost(summary["self"], 12))
            for figure in figures:
                if figure.ok is False:
                    figure.why += "; profile (self time): " + cost(summary["self"], 5)
    return figures
