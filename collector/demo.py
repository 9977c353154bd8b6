"""`make demo`: a private Mosquitto and a few real agent processes, their messages printed live.

Each agent runs the real host and link probes; one kit's district link points at a closed port
so a failing kit is visible. Runs until Ctrl-C, or DEMO_SECONDS seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import messages, wire
from collector.devbroker import Mosquitto, free_port

KITS = [("sintang", "sintang", "kit-1"), ("sintang", "dedai", "kit-1"), ("sintang", "serawai", "kit-1")]


def _agent_config(workdir: Path, broker: Mosquitto, kit: tuple[str, str, str], district_port: int) -> Path:
    kab, kec, kit_id = kit
    config = {
        "kit": {"kabupaten": kab, "kecamatan": kec, "id": kit_id},
        "broker": {"url": broker.url, "will_delay": 2, "reconnect_max_delay": 5},
        "heartbeat": 10,
        "state_dir": str(workdir / f"state-{kec}-{kit_id}"),
        "probes": {
            "host": {"interval": 5},
            "link": {"interval": 5, "count": 1, "attempt_timeout": 1,
                     "targets": {"district": {"host": "127.0.0.1", "port": district_port}}},
        },
    }
    path = workdir / f"agent-{kec}-{kit_id}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _line(topic: str, payload: bytes) -> str:
    try:
        kit, kind = wire.parse_topic(topic)
        if kind == "status":
            status = wire.decode_status(payload)
            return f"{kit}  status {status.state} {status.reason}".rstrip()
        report = wire.decode_report(payload, kit)
    except wire.WireError as exc:
        return f"{topic}  refused: {exc}"
    parts = [f"{name}={entry.s}" + (f" ({messages.reason(name, entry.c, entry.m)})" if entry.c else "")
             for name, entry in report.p.items()]
    flag = " replayed" if report.replay else ""
    return f"{kit}  report #{report.seq}{flag} {len(payload)} B: " + ", ".join(parts)


def run(seconds: float | None = None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ektp-demo-"))
    broker = Mosquitto(workdir / "broker").start()
    agents: list[subprocess.Popen] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    district = free_port()  # the "district server": a listener the healthy kits can reach
    listener = socket.create_server(("127.0.0.1", district))
    closed = free_port()  # nothing listens here: that kit's link is down
    try:
        print(f"ektp-monitor demo: Mosquitto on {broker.url}; files in {workdir}")
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        client.on_connect = lambda c, *a: c.subscribe(wire.subscription(), qos=1)
        client.on_message = lambda c, u, msg: print(_line(msg.topic, msg.payload), flush=True)
        client.connect(broker.host, broker.port)
        client.loop_start()
        for index, kit in enumerate(KITS):
            config = _agent_config(workdir, broker, kit, closed if index == len(KITS) - 1 else district)
            log = open(workdir / f"{config.stem}.log", "wb")
            agents.append(subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(config)],
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        print(f"{len(agents)} agents started; " + ("Ctrl-C stops" if not seconds else f"stopping after {seconds:g} s"))
        deadline = time.monotonic() + seconds if seconds else None
        while not stop.is_set():
            if deadline and time.monotonic() >= deadline:
                break
            stop.wait(0.2)
        client.disconnect()
        client.loop_stop()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in agents:
            proc.terminate()
        for proc in agents:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        listener.close()
        broker.stop()
        print("demo stopped; every process it started has ended")
    return 0


def main() -> int:
    seconds = os.environ.get("DEMO_SECONDS")
    return run(float(seconds) if seconds else None)
