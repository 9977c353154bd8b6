"""1. Agent footprint: one real agent with every probe next to Debian's prometheus-node-exporter.

The agent is a SimFleet kit (sysfs tree, Megatec UPS on a pty, district TCP listener) with every
probe at a 1 s interval and a 2 s heartbeat, connected to a private Mosquitto. After a warm-up,
CPU (utime+stime from /proc/<pid>/stat) is read across a window of probe cycles (one cycle = every
probe ran once = one interval) and RSS (VmRSS) at its end. node_exporter runs with its default
collectors on a free loopback port; it is scraped a few times, then CPU is read across a series
of scrapes and RSS after them.

The agent runs from this work tree with its bytecode compiled first, as `pip install` leaves an
installed agent: with PYTHONDONTWRITEBYTECODE=1 (set in CI and on the bench machine) the tree has no
__pycache__ and every agent start would compile its modules from source, which a kit never does.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import yaml

from bench.common import (
    PYTHON,
    ROOT,
    Ctx,
    Figure,
    cpu_seconds,
    env_python_rss,
    find_tool,
    http_get,
    mb,
    median,
    memory,
    package_version,
    stop_process,
    wait_for,
)
from collector.devbroker import Mosquitto, free_port
from collector.simfleet import SimFleet

NAME = "footprint"
TITLE = "Agent footprint"
INTERVAL = 1.0
HEARTBEAT = 2

# What a running agent with every probe type imports (probe modules load when their type is used).
AGENT_IMPORTS = "agent imports (cli, service, every probe)"
IMPORTS = {
    "python -c pass": "pass",
    AGENT_IMPORTS: "import agent.cli, agent.service\nfrom agent.probes import REGISTRY\nfor t in REGISTRY: REGISTRY[t]",
    "  of which paho.mqtt.client": "import paho.mqtt.client",
    "  of which msgspec": "import msgspec",
    "  of which yaml": "import yaml",
    "  of which psutil": "import psutil",
    "  of which serial": "import serial",
    "  of which sqlite3": "import sqlite3",
    "  of which ssl": "import ssl",
    "  of which concurrent.futures": "import concurrent.futures",
}


def compile_agent() -> None:
    """Writes the agent's bytecode (agent/__pycache__, ignored by git) as pip does on install."""
    done = subprocess.run([PYTHON, "-m", "compileall", "-q", str(ROOT / "agent")], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError("compileall agent/ failed: " + (done.stdout + done.stderr)[-2000:])


def _agent_config(kit, broker_url: str) -> None:
    path = kit.write_config(broker_url, heartbeat=HEARTBEAT, interval=INTERVAL)
    config = yaml.safe_load(path.read_text())
    for name, probe in config["probes"].items():
        probe["interval"] = INTERVAL
        probe["timeout"] = INTERVAL
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def measure_agent(ctx: Ctx, broker: Mosquitto, warmup: float, window: float, profile: Path | None = None) -> dict:
    fleet = SimFleet(ctx.tmp("agent"))
    try:
        kit = fleet.add("sintang", "dedai", "kit-1")
        _agent_config(kit, broker.url)
        kit.start()
        pid = kit.proc.pid
        wait_for(lambda: (kit.directory / "state" / "outbox.sqlite").exists(), 20, 0.1, "the agent to start")
        time.sleep(warmup)
        if kit.proc.poll() is not None:
            raise RuntimeError("the agent exited: " + (kit.directory / "agent.log").read_text()[-2000:])
        rss_start = memory(pid)["rss"]
        spy = None
        if profile is not None:
            from bench.ingest import find_py_spy

            spy = subprocess.Popen([str(find_py_spy()), "record", "--pid", str(pid), "--rate", "100", "--duration",
                                    str(int(window)), "--format", "raw", "--threads", "--nonblocking",
                                    "-o", str(profile)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(window)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        if spy is not None:
            spy.wait(60)
        mem = memory(pid)
        cycles = (t1 - t0) / INTERVAL
        return {"rss": mem["rss"], "anon": mem["anon"], "file": mem["file"], "threads": mem["threads"],
                "rss_growth": mem["rss"] - rss_start, "cycles": round(cycles, 1),
                "cpu_per_cycle": (cpu1 - cpu0) / cycles}
    finally:
        fleet.close()


def measure_node_exporter(ctx: Ctx, warm_scrapes: int, scrapes: int) -> dict:
    exe = find_tool("prometheus-node-exporter")
    if exe is None:
        raise RuntimeError("prometheus-node-exporter is not installed (apt-get install prometheus-node-exporter)")
    port = free_port()
    workdir = ctx.tmp("node-exporter")
    with open(workdir / "node-exporter.log", "ab") as log:
        proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{port}"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        def up():
            try:
                return http_get(url, 5)[0] == 200
            except OSError:
                return False

        wait_for(up, 20, 0.1, "node_exporter to answer")
        for _ in range(warm_scrapes):
            http_get(url)
        cpu0 = cpu_seconds(proc.pid)
        size = 0
        for _ in range(scrapes):
            size = len(http_get(url)[1])
            time.sleep(0.1)
        cpu1 = cpu_seconds(proc.pid)
        mem = memory(proc.pid)
        return {"rss": mem["rss"], "anon": mem["anon"], "file": mem["file"], "threads": mem["threads"],
                "cpu_per_scrape": (cpu1 - cpu0) / scrapes, "bytes_per_scrape": size}
    finally:
        stop_process(proc)


def run(ctx: Ctx) -> list[Figure]:
    warmup, window = (2.0, 3.0) if ctx.quick else (10.0, 60.0)
    warm_scrapes, scrapes = (3, 5) if ctx.quick else (5, 30)
    agents, peers = [], []
    compile_agent()
    with Mosquitto(ctx.tmp("broker")) as broker:
        for i in range(ctx.runs):
            agents.append(measure_agent(ctx, broker, warmup, window))
            ctx.log(f"  agent run {i + 1}: RSS {mb(agents[-1]['rss']):.1f} MB, "
                    f"{agents[-1]['cpu_per_cycle'] * 1000:.2f} ms CPU per cycle over {agents[-1]['cycles']} cycles")
            peers.append(measure_node_exporter(ctx, warm_scrapes, scrapes))
            ctx.log(f"  node_exporter run {i + 1}: RSS {mb(peers[-1]['rss']):.1f} MB, "
                    f"{peers[-1]['cpu_per_scrape'] * 1000:.2f} ms CPU per scrape")
    imports = {label: env_python_rss(code) for label, code in IMPORTS.items()}

    def med(rows, key, scale=1.0):
        return median([r[key] * scale for r in rows])

    agent_rss, agent_cpu = med(agents, "rss", 1e-6), med(agents, "cpu_per_cycle", 1000)
    ne_rss, ne_cpu = med(peers, "rss", 1e-6), med(peers, "cpu_per_scrape", 1000)
    version = package_version("prometheus-node-exporter") or "?"
    peer_rss = f"node_exporter {version.split('-')[0]}: {ne_rss:.1f} MB"
    base = imports["python -c pass"]["rss"] * 1e-6
    imported = imports[AGENT_IMPORTS]["rss"] * 1e-6
    anon, file_ = med(agents, "anon", 1e-6), med(agents, "file", 1e-6)
    breakdown = (f"bare python {base:.1f} MB; + agent imports -> {imported:.1f} MB; running agent {agent_rss:.1f} MB "
                 f"({anon:.1f} MB anonymous heap/stacks, {file_:.1f} MB mapped files/libraries, "
                 f"{med(agents, 'threads'):.0f} threads)")
    biggest = sorted(((label.replace("  of which ", ""), v["rss"] * 1e-6 - base) for label, v in imports.items()
                      if label.startswith("  of which")), key=lambda x: -x[1])[:3]
    why_rss = (f"{breakdown}; the interpreter and imports alone are {imported:.1f} MB, "
               f"largest imports: " + ", ".join(f"{n} +{v:.1f} MB" for n, v in biggest))
    figures = [
        Figure("agent_rss_mb", "Agent RSS, steady state (all probes, 1 s interval)", agent_rss, "MB",
               "<= node_exporter's RSS (same run)", agent_rss <= ne_rss, peer_rss,
               [round(r["rss"] * 1e-6, 2) for r in agents], "" if agent_rss <= ne_rss else why_rss,
               note=f"RSS growth over the window: {med(agents, 'rss_growth', 1e-6):+.2f} MB"),
        Figure("agent_cpu_ms_per_cycle", "Agent CPU per probe cycle (8 probes)", agent_cpu, "ms", "< 20 ms",
               agent_cpu < 20, f"node_exporter: {ne_cpu:.2f} ms per scrape",
               [round(r["cpu_per_cycle"] * 1000, 3) for r in agents],
               "" if agent_cpu < 20 else f"measured {agent_cpu:.1f} ms of CPU per 1 s cycle of 8 probes",
               note=f"{agents[0]['cycles']:.0f} cycles per run after {warmup:.0f} s warm-up; "
                    f"= {agent_cpu / 10:.2f} % of one core at 1 s intervals"),
        Figure("node_exporter_rss_mb", "node_exporter RSS after scrapes (peer)", ne_rss, "MB",
               runs=[round(r["rss"] * 1e-6, 2) for r in peers], note="CONTEXT.md: 20.0 MB idle"),
        Figure("node_exporter_cpu_ms_per_scrape", "node_exporter CPU per scrape (peer)", ne_cpu, "ms",
               runs=[round(r["cpu_per_scrape"] * 1000, 3) for r in peers],
               note=f"CONTEXT.md: 4.5 ms; {peers[0]['bytes_per_scrape']:,} bytes per scrape"),
        Figure("python_bare_rss_mb", "RSS of `python -c pass` (this venv)", base, "MB", note="CONTEXT.md: 8.6 MB"),
        Figure("python_agent_imports_rss_mb", "RSS after the agent's imports (cli, service, every probe)", imported,
               "MB"),
        Figure("agent_rss_anon_mb", "Running agent: anonymous RSS (heap, stacks)", anon, "MB",
               note=f"mapped files/libraries: {file_:.1f} MB; {med(agents, 'threads'):.0f} threads"),
    ]
    if agent_cpu >= 20 and not ctx.quick:
        from bench.ingest import find_py_spy, summarize_profile

        if find_py_spy() is None:
            ctx.note("CPU goal missed; install py-spy (or set PY_SPY) to see which probe dominates")
        else:
            out = ctx.workdir / "agent-profile.txt"
            with Mosquitto(ctx.tmp("broker-profile")) as broker:
                row = measure_agent(ctx, broker, warmup, 30.0, profile=out)
            summary = summarize_profile(out, 15)
            ctx.extra["agent_profile"] = summary

            def cost(items, n):
                return ", ".join([f"{k} {v}% (~{v * agent_cpu / 100:.1f} ms)" for k, v in items
                                  if not k.startswith(("Thread.", "Thread._", "_WorkItem.run",
                                                       "_worker (thread.py"))][:n])

            text = (f"py-spy, 30 s of one more agent ({row['cpu_per_cycle'] * 1000:.1f} ms/cycle while profiled; "
                    f"ms = share x {agent_cpu:.1f} ms): inclusive " + cost(summary["inclusive"], 6)
                    + "; self " + cost(summary["self"], 5))
            figures[1].why += "; " + text
            ctx.note("agent CPU profile, by thread: " + ", ".join(f"{k.split(': ')[-1]} {v}%"
                                                                  for k, v in summary["threads"][:8]))
    ctx.extra["agents"] = agents
    ctx.extra["node_exporter"] = peers
    ctx.extra["imports_rss_mb"] = {k.strip(): round(v["rss"] * 1e-6, 2) for k, v in imports.items()}
    ctx.note("memory: " + breakdown + "; import costs over bare python: "
             + ", ".join(f"{k.replace('  of which ', '')} +{v['rss'] * 1e-6 - base:.1f} MB"
                         for k, v in imports.items() if k.startswith("  of which")))
    ctx.note(f"interpreter: {PYTHON}")
    return figures
