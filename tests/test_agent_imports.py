"""The agent loads only what it uses: a probe type's module (and its libraries) only when the config
uses that type, and nothing that `run` never needs. Every module is memory held for the agent's
life (bench/footprint.py measures it), so these are checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from agent.probes import REGISTRY
from conftest import ROOT

KIT = """
kit: {kabupaten: sintang, kecamatan: dedai, id: kit-1}
broker: {url: "mqtt://127.0.0.1:1883"}
state_dir: STATE
paths: {sysfs: SYSFS}
probes:
"""


def modules_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def write_config(tmp_path, probes: str) -> str:
    path = tmp_path / "agent.yaml"
    text = KIT.replace("STATE", str(tmp_path / "state")).replace("SYSFS", str(ROOT / "tests/fixtures/sysfs/all-present"))
    path.write_text(text + textwrap.indent(textwrap.dedent(probes), "  "))
    return str(path)


def test_registry_names_each_class_by_its_type_name():
    assert sorted(REGISTRY) == ["camera", "card_reader", "host", "link", "ups", "usb"]
    for name in REGISTRY:
        assert REGISTRY[name].type_name == name
    assert "nothing" not in REGISTRY


def test_probe_modules_load_only_for_configured_types(tmp_path):
    config = write_config(tmp_path, """
        fingerprint: {ids: ["05ba:000a"]}
        iris: {ids: ["1d6b:0104"]}
    """)
    loaded = modules_after(f"""
        from agent import probes
        from agent.config import load
        from agent.service import probe_context
        config = load({config!r})
        made = [probes.create(spec, probe_context(config)) for spec in config.probes]
        assert [p.run().s for p in made] == ["ok", "ok"]
    """)
    assert "agent.probes.usb" in loaded
    assert not loaded & {"agent.probes.host", "agent.probes.link", "agent.probes.ups", "agent.probes.camera",
                         "agent.probes.card_reader", "psutil", "serial"}


def test_the_running_agent_leaves_out_what_it_does_not_use(tmp_path):
    """Every probe type configured; the UPS through NUT, so no serial port and no pyserial."""
    config = write_config(tmp_path, """
        host: {temperatures: false}
        link: {count: 2, targets: {district: {host: 127.0.0.1, port: 9}}}
        fingerprint: {ids: ["05ba:000a"]}
        camera: {ids: ["046d:082d"]}
        card_reader: {ids: ["072f:90cc"], pcsc: false}
        ups: {driver: nut, ups: myups, port: 9, reply_timeout: 0.5}
    """)
    loaded = modules_after(f"""
        from agent.cli import _parser
        from agent.config import load
        from agent.service import Agent
        args = _parser().parse_args(["run", "-c", {config!r}])
        agent = Agent(load(args.config))
        for slot in agent.runner.slots:
            slot.probe.run()
        agent.runner.close()
        agent.outbox.close()
    """)
    assert {"agent.probes.host", "agent.probes.link", "agent.probes.ups", "psutil", "paho.mqtt.client"} <= loaded
    # json: only `check --json` and Windows; statistics (with fractions): one median; pyserial: megatec only
    assert not loaded & {"json", "statistics", "fractions", "serial"}


def test_megatec_ups_imports_pyserial_when_it_runs(tmp_path):
    loaded = modules_after(f"""
        import sys
        import msgspec
        from agent.probes.base import ProbeContext
        from agent.probes.ups import UpsProbe
        assert "serial" not in sys.modules
        probe = UpsProbe("ups", msgspec.convert({{"port": {str(tmp_path / "ttyUSB9")!r}}}, UpsProbe.Options),
                         ProbeContext())
        entry = probe.run()
        assert (entry.s, entry.c) == ("error", "port_unavailable"), entry
        probe.close()
    """)
    assert "serial" in loaded
