"""4. Scrape cost: /metrics render time and collector RSS at 1,000, 5,000 and 15,000 kits.

The collector runs as its own process (`python -m collector run`). The fleet is filled through
the broker: one status and one full-kit report per kit, published in chunks of 2,500 (the next
chunk once the collector is idle again), so the figure is the fleet's memory, not a transient
backlog in the inbox. Then, with urllib:
- cold: the first GET /metrics (every kit rendered for the first time);
- warm: GETs with nothing changed since the last one (median of 5);
- after a round: every kit sends one more report, then one GET. This is the steady state when
  Prometheus scrapes no more often than the 60 s heartbeat: every kit has changed in between.
RSS (VmRSS) is read after the last GET.
"""

from __future__ import annotations

import marshal
import time
import urllib.request
from pathlib import Path

from bench.common import (
    CollectorProcess,
    Ctx,
    DistrictMosquitto,
    Figure,
    cpu_seconds,
    median,
    memory,
    metric_value,
    timed_get,
)
from bench.ingest import Peer, Publisher, make_stream

NAME = "scrape"
TITLE = "Scrape cost"
CHUNK = 2_500
GOAL_SECONDS = 0.5
GOAL_MB = 200


def chunks(path: Path, out: Path, size: int = CHUNK) -> list[Path]:
    messages = marshal.loads(path.read_bytes())
    files = []
    for i in range(0, len(messages), size):
        f = out / f"{path.stem}-{i // size:03d}.m"
        f.write_bytes(marshal.dumps(messages[i:i + size]))
        files.append(f)
    return files


def get_split(url: str) -> tuple[float, float, bytes]:
    """(seconds to the response headers, seconds in all, body). The collector sends its headers
    with the first family, once every kit's lines are rendered, so the first part is rendering and
    the rest is joining, encoding and streaming the text."""
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as response:
        first = time.perf_counter() - start
        body = response.read()
    return first, time.perf_counter() - start, body


def wait_idle(pid: int, quiet: float = 0.3, timeout: float = 120) -> None:
    """Until the process has used < 10 % of a core for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    t0, c0 = time.monotonic(), cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        t1, c1 = time.monotonic(), cpu_seconds(pid)
        if c1 - c0 < 0.1 * (t1 - t0):
            return
        t0, c0 = t1, c1
    raise TimeoutError("the collector stayed busy")


def feed(files: list[Path], broker, pid: int) -> None:
    for f in files:
        pub = Publisher(f, broker, 1)
        pub.go()
        pub.result()
        wait_idle(pid)


def one_run(ctx: Ctx, kits: int, streams: dict[str, list[Path]]) -> dict:
    workdir = ctx.tmp(f"kits-{kits}")
    broker = DistrictMosquitto(workdir / "broker").start()
    collector = None
    try:
        collector = CollectorProcess(workdir, broker, "collector", fleet={"max_kits": max(20_000, kits)}).start()
        feed(streams["statuses"] + streams["reports"], broker, collector.pid)
        fleet_only = memory(collector.pid)
        first_byte, cold, body = get_split(collector.url + "/metrics")
        received = metric_value(body.decode(), "ektp_collector_messages_received_total")
        if received is None or received < 2 * kits:
            raise RuntimeError(f"the collector received {received} of {2 * kits} messages")
        samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        warm = [timed_get(collector.url + "/metrics")[0] for _ in range(5)]
        feed(streams["round"], broker, collector.pid)
        after_round, _ = timed_get(collector.url + "/metrics")
        mem = memory(collector.pid)
        return {"kits": kits, "cold": cold, "cold_first_byte": first_byte, "warm": median(warm), "round": after_round,
                "rss_mb": mem["rss"] / 1e6, "anon_mb": mem["anon"] / 1e6, "rss_before_scrape_mb": fleet_only["rss"] / 1e6,
                "bytes": len(body), "samples": samples}
    finally:
        if collector is not None:
            collector.stop()
        broker.stop()


def peer_run(ctx: Ctx, kits: int, streams: dict[str, list[Path]]) -> dict:
    """mqtt2prometheus fed the same reports (it has no status topic): its /metrics time and RSS."""
    workdir = ctx.tmp(f"peer-{kits}")
    broker = DistrictMosquitto(workdir / "broker").start()
    peer = None
    try:
        peer = Peer(workdir, broker, kits, 1)
        feed(streams["reports_json"], broker, peer.pid)  # it cannot read zlib
        first, _ = timed_get(peer.url)
        times = [timed_get(peer.url)[0] for _ in range(3)]
        body = timed_get(peer.url)[1]
        mem = memory(peer.pid)
        samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        return {"first": first, "render": median(times), "rss_mb": mem["rss"] / 1e6, "samples": samples,
                "bytes": len(body)}
    finally:
        if peer is not None:
            peer.stop()
        broker.stop()


def run(ctx: Ctx) -> list[Figure]:
    sizes = [200] if ctx.quick else [1_000, 5_000, 15_000]
    results: dict[int, list[dict]] = {}
    for kits in sizes:
        statuses, first, second = make_stream(ctx.tmp(f"stream-{kits}"), kits, kits, True)
        out = ctx.tmp(f"chunks-{kits}")
        json_reports = make_stream(ctx.tmp(f"stream-json-{kits}"), kits, kits, False)[1]
        streams = {"statuses": chunks(statuses, out), "reports": chunks(first, out), "round": chunks(second, out),
                   "reports_json": chunks(json_reports, ctx.tmp(f"chunks-json-{kits}"))}
        for i in range(ctx.runs):
            row = one_run(ctx, kits, streams)
            row["peer"] = peer_run(ctx, kits, streams)
            results.setdefault(kits, []).append(row)
            ctx.log(f"  {kits:,} kits run {i + 1}: cold {row['cold']:.3f} s, warm {row['warm']:.3f} s, after a round "
                    f"{row['round']:.3f} s, RSS {row['rss_mb']:.0f} MB, {row['samples']:,} samples, "
                    f"{row['bytes'] / 1e6:.1f} MB of text; mqtt2prometheus {row['peer']['render']:.3f} s, "
                    f"{row['peer']['rss_mb']:.0f} MB, {row['peer']['samples']:,} samples")
    figures = []
    largest = sizes[-1]
    for kits in sizes:
        rows = results[kits]

        def med(key):
            return median([r[key] for r in rows])

        def runs(key, digits=3):
            return [round(r[key], digits) for r in rows]

        judged = kits == largest and not ctx.quick
        peer_render = median([r["peer"]["render"] for r in rows])
        peer_rss = median([r["peer"]["rss_mb"] for r in rows])
        peer_samples = median([r["peer"]["samples"] for r in rows])
        peer = f"mqtt2prometheus: {peer_render:.3f} s for {peer_samples:,.0f} samples"
        peer_mem = f"mqtt2prometheus: {peer_rss:.0f} MB"
        note = (f"{med('samples'):,.0f} samples ({med('samples') / kits:.0f} per kit), {med('bytes') / 1e6:.1f} MB of "
                f"text; cold: {med('cold_first_byte'):.2f} s to the first byte (every kit's lines rendered), the rest "
                f"joining, encoding and streaming; warm {med('warm'):.3f} s")
        figures.append(Figure(f"render_cold_{kits}", f"/metrics at {kits:,} kits, cold (first scrape)", med("cold"), "s",
                              f"<= {GOAL_SECONDS} s" if judged else "", (med("cold") <= GOAL_SECONDS) if judged else None,
                              peer, runs("cold"), "" if not judged or med("cold") <= GOAL_SECONDS else
                              f"measured {med('cold_first_byte'):.2f} s rendering {med('samples'):,.0f} samples "
                              f"({med('samples') / kits:.0f} per kit) before the first byte, then "
                              f"{med('cold') - med('cold_first_byte'):.2f} s joining and streaming "
                              f"{med('bytes') / 1e6:.0f} MB of text; even unchanged (warm) {med('warm'):.2f} s", note))
        figures.append(Figure(f"render_round_{kits}", f"/metrics at {kits:,} kits, after every kit reported again",
                              med("round"), "s", f"<= {GOAL_SECONDS} s" if judged else "",
                              (med("round") <= GOAL_SECONDS) if judged else None, peer, runs("round"),
                              "" if not judged or med("round") <= GOAL_SECONDS else
                              f"every kit changed since the last scrape, so each is rendered again "
                              f"(cold {med('cold'):.2f} s, warm {med('warm'):.3f} s)",
                              "the steady state when scrapes are >= 60 s apart (heartbeat 60 s)"))
        figures.append(Figure(f"render_warm_{kits}", f"/metrics at {kits:,} kits, warm (nothing changed)", med("warm"),
                              "s", runs=runs("warm")))
        figures.append(Figure(f"rss_{kits}", f"Collector RSS at {kits:,} kits", med("rss_mb"), "MB",
                              f"<= {GOAL_MB} MB" if judged else "", (med("rss_mb") <= GOAL_MB) if judged else None,
                              peer_mem, runs("rss_mb", 1), "" if not judged or med("rss_mb") <= GOAL_MB else
                              f"measured: {med('rss_before_scrape_mb'):.0f} MB with the fleet loaded, before any "
                              f"scrape; scraping (one pass over the fleet into columns, {med('bytes') / 1e6:.0f} MB "
                              f"of text sent in blocks, nothing kept between scrapes) takes it to "
                              f"{med('rss_mb'):.0f} MB ({med('anon_mb'):.0f} MB anonymous heap: CPython returns "
                              f"little freed memory to the system)",
                              f"before the first scrape {med('rss_before_scrape_mb'):.0f} MB; anonymous (heap) {med('anon_mb'):.0f} MB"))
    ctx.note("peer: mqtt2prometheus (28 fields per report mapped, as in the ingest benchmark) fed the same reports "
             "as plain JSON (it cannot read zlib) through its own fresh broker; /metrics timed after one first GET "
             "(median of 3)")
    ctx.note("fleet filled through Mosquitto (status + one zlib report per kit, chunks of 2,500, QoS 1), not in-process")
    ctx.extra["runs"] = {str(k): v for k, v in results.items()}
    return figures
