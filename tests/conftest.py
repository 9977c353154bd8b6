"""Shared fixtures: a real Mosquitto, a recording subscriber, agent processes, TCP targets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import wire
from collector.devbroker import Mosquitto, free_port
from collector.simfleet import DistrictServer

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Polls `predicate` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def broker(tmp_path):
    with Mosquitto(tmp_path / "broker") as mosq:
        yield mosq


class Message:
    def __init__(self, topic: str, payload: bytes, retain: bool, received: float):
        self.topic = topic
        self.payload = payload
        self.retain = retain
        self.received = received
        self.kit, self.kind = wire.parse_topic(topic)

    def decode(self):
        if self.kind == "status":
            return wire.decode_status(self.payload)
        return wire.decode_report(self.payload, self.kit)


class Recorder:
    """Subscribes to every kit topic and keeps what arrives."""

    def __init__(self, broker: Mosquitto, topic: str = "ektp/v1/#", tls_ca: str | None = None,
                 session: str | None = None):
        """With `session` (a client id), the subscription and queued messages outlive a
        broker restart when the broker keeps persistence."""
        self.messages: list[Message] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=session or "",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        props = None
        if session:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.client.connect(broker.host, broker.port, clean_start=not session, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(10), "recorder could not subscribe"

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))

    def of(self, kind: str) -> list[Message]:
        with self.lock:
            return [m for m in self.messages if m.kind == kind]

    def reports(self) -> list[wire.Report]:
        return [m.decode() for m in self.of("report")]

    def statuses(self) -> list[wire.Status]:
        return [m.decode() for m in self.of("status")]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def recorder_factory():
    made = []

    def make(broker, **kw):
        rec = Recorder(broker, **kw)
        made.append(rec)
        return rec

    yield make
    for rec in made:
        rec.close()


# A TCP listener the link probe can reach: close() makes it refuse, open() accept again.
TcpTarget = DistrictServer


@pytest.fixture
def tcp_target():
    target = TcpTarget()
    yield target
    target.close()


def write_agent_config(path: Path, mosq: Mosquitto | None, state_dir: Path, **overrides) -> Path:
    """An agent config for tests: fast intervals, a link probe to `target_port` when given."""
    target_port = overrides.pop("target_port", None)
    kit = overrides.pop("kit", {"kabupaten": "sintang", "kecamatan": "dedai", "id": "kit-1"})
    config = {
        "kit": kit,
        "broker": {"url": mosq.url if mosq else "mqtt://127.0.0.1:1", "will_delay": 0, "keepalive": 5,
                   "reconnect_max_delay": 1},
        "heartbeat": 1,
        "state_dir": str(state_dir),
        "probes": {"host": {"interval": 1, "temperatures": False}},
    }
    if target_port:
        config["probes"]["link"] = {
            "interval": 0.2,
            "timeout": 0.2,
            "count": 1,
            "attempt_timeout": 0.1,
            "targets": {"district": {"host": "127.0.0.1", "port": target_port}},
        }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class AgentProcess:
    def __init__(self, config: Path, log: Path):
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AgentProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(self.config), "--log-level", "debug"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env,
            )
        return self

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def agent_process(tmp_path):
    made = []

    def make(config: Path) -> AgentProcess:
        proc = AgentProcess(config, tmp_path / f"agent-{len(made)}.log")
        made.append(proc)
        return proc.start()

    yield make
    for proc in made:
        proc.kill()


def write_collector_config(path: Path, mosq: Mosquitto, store: Path, **overrides) -> Path:
    config = {
        "broker": {"url": mosq.url, "client_id": f"collector-{path.stem}"},
        "http": {"listen": "127.0.0.1:0"},
        "store": {"path": str(store)},
        "fleet": {"required_devices": []},
        "inventory": {},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict) and key != "inventory":
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def collector_factory(tmp_path):
    """Starts collectors in this process; each is closed at the end of the test."""
    from collector.config import load
    from collector.service import Collector

    made = []

    def make(mosq: Mosquitto, name: str = "collector", **overrides):
        path = write_collector_config(tmp_path / f"{name}.yaml", mosq, tmp_path / f"{name}.sqlite", **overrides)
        collector = Collector(load(path))
        collector.start()
        made.append(collector)
        assert collector.ingest.subscribed.wait(10), "the collector did not subscribe"
        return collector

    yield make
    for collector in made:
        if collector.server is not None:
            collector.close()


def http_get(url: str, **kw) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10, **kw) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def figures(request):
    """Records figures a reliability test measured; `make reliability-report` turns them into
    docs/reliability.md. Without EKTP_FIGURES they are only kept for the test's own asserts."""
    import json as _json

    recorded: dict = {}
    yield recorded
    out = os.environ.get("EKTP_FIGURES")
    if out and recorded:
        line = {"test": request.node.nodeid, "passed": not getattr(request.node, "failed_call", False), **recorded}
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(_json.dumps(line) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.failed_call = True


class CollectorProcess:
    """`ektp-collector run` as its own process, for tests that kill it."""

    def __init__(self, config: Path, log: Path):
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.port = yaml.safe_load(config.read_text())["http"]["listen"].rpartition(":")[2]

    def start(self) -> "CollectorProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "collector", "run", "-c", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(self._healthy, timeout=20, what="the collector to be healthy")
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the collector exited: {self.log()[-2000:]}")
        try:
            return http_get(f"http://127.0.0.1:{self.port}/healthz")[0] == 200
        except OSError:
            return False

    def api(self, path: str):
        import json as _json

        status, body = http_get(f"http://127.0.0.1:{self.port}{path}")
        assert status == 200, body
        return _json.loads(body)

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.port}/metrics")[1].decode()

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def collector_process(tmp_path):
    made = []

    def make(mosq: Mosquitto, name: str = "collector", **overrides) -> CollectorProcess:
        path = tmp_path / f"{name}.yaml"
        if not path.exists():
            overrides.setdefault("http", {"listen": f"127.0.0.1:{free_port()}"})
            write_collector_config(path, mosq, tmp_path / f"{name}.sqlite", **overrides)
        proc = CollectorProcess(path, tmp_path / f"{name}.log").start()
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()
