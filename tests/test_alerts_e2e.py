"""Once for real: a fixture device removed -> agent -> broker -> collector -> email on loopback SMTP."""

import os
import subprocess
import sys

import yaml

from agent import wire
from conftest import ROOT, wait_for, write_collector_config
from test_alerts import SmtpServer, subjects
from test_usb_probe import copy_tree, unplug

ALERTS = {"kit_down": {"hold": 0, "recover": 0}, "digest_window": 0, "evaluate_every": 0.2,
          "recipients": {"everywhere": ["it@disdukcapil.example"]}}


def test_unplugged_fingerprint_reader_reaches_the_inbox(tmp_path, broker, collector_factory, agent_process):
    smtp = SmtpServer()
    smtp.start()
    try:
        tree = copy_tree("all-present", tmp_path)
        collector = collector_factory(
            broker, fleet={"required_devices": ["fingerprint"]},
            inventory={"sintang": {"kecamatan": {"dedai": {"kits": ["kit-1"], "name": "Dedai"}}}},
            alerts={**ALERTS, "smtp": {"host": "127.0.0.1", "port": smtp.port, "security": "none", "timeout": 5}})
        config = {
            "kit": {"kabupaten": "sintang", "kecamatan": "dedai", "id": "kit-1"},
            "broker": {"url": broker.url, "will_delay": 0, "reconnect_max_delay": 1},
            "heartbeat": 30, "state_dir": str(tmp_path / "state"), "paths": {"sysfs": str(tree)},
            "probes": {"fingerprint": {"ids": ["05ba:000a"], "interval": 0.3, "timeout": 0.3}},
        }
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
        agent_process(tmp_path / "agent.yaml")
        kit = wire.KitId("sintang", "dedai", "kit-1")
        wait_for(lambda: collector.fleet.get(kit).ready, timeout=15, what="the kit to be ready")
        unplug(tree, "1-1.1")
        wait_for(lambda: subjects(smtp, "it@disdukcapil.example"), timeout=15, what="the alert email")
        assert subjects(smtp, "it@disdukcapil.example") == [
            "[e-KTP] Kec. Dedai kit-1: pemindai sidik jari tidak terdeteksi"]
    finally:
        smtp.stop()


def test_test_email_command(tmp_path, broker):
    smtp = SmtpServer()
    smtp.start()
    try:
        path = write_collector_config(
            tmp_path / "c.yaml", broker, tmp_path / "c.sqlite",
            inventory={"sintang": {"kecamatan": {"dedai": {"kits": ["kit-1"], "name": "Dedai"}}}},
            alerts={"smtp": {"host": "127.0.0.1", "port": smtp.port, "security": "none", "timeout": 5}})
        run = lambda *a: subprocess.run([sys.executable, "-m", "collector", "test-email", "-c", str(path), *a],
                                        capture_output=True, text=True, timeout=60, cwd=ROOT,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
        done = run("--to", "kasi@disdukcapil.example")
        assert done.returncode == 0, done.stderr
        assert subjects(smtp, "kasi@disdukcapil.example") == [
            "[UJI/TEST] [e-KTP] Kec. Dedai kit-1: pemindai iris tidak terdeteksi"]
        smtp.stop()
        failed = run("--to", "kasi@disdukcapil.example")
        assert failed.returncode == 1 and "failed: ConnectionRefusedError" in failed.stderr
    finally:
        smtp.stop()
