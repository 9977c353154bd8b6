"""config/windows/: the WinSW service definition parses and runs the agent's real command.

Nothing here runs on Windows; this only keeps the file well-formed and in step with the CLI.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from agent import cli
from conftest import ROOT

WINDOWS = ROOT / "config" / "windows"
CONFIG = r"C:\ProgramData\ektp-agent\agent.yaml"


def service() -> ET.Element:
    root = ET.parse(WINDOWS / "ektp-agent.xml").getroot()
    assert root.tag == "service"
    return root


def test_the_service_runs_the_agent_with_the_windows_config():
    root = service()
    assert root.findtext("id") == "ektp-agent", "WinSW pairs ektp-agent.exe with ektp-agent.xml"
    assert root.findtext("name") and root.findtext("description")
    assert root.findtext("executable") == r"%BASE%\venv\Scripts\python.exe"
    args = root.findtext("arguments").split()
    assert args[:2] == ["-m", "agent"], "python -m agent"
    parsed = cli._parser().parse_args(args[2:])  # the agent's own argument parser accepts the rest
    assert parsed.command == "run" and parsed.config == CONFIG
    assert CONFIG in (ROOT / "agent" / "cli.py").read_text(), "the agent's Windows default config path"


def test_restarts_on_failure_and_bounds_its_logs():
    root = service()
    failures = root.findall("onfailure")
    assert [f.get("action") for f in failures] == ["restart"] * 3
    delays = [re.fullmatch(r"(\d+) sec", f.get("delay")) for f in failures]
    assert all(delays) and [int(d.group(1)) for d in delays] == sorted(int(d.group(1)) for d in delays)
    assert re.fullmatch(r"\d+ (sec|min|hour|day)s?", root.findtext("resetfailure"))
    log = root.find("log")
    assert log.get("mode") == "roll-by-size"
    assert 0 < int(log.findtext("sizeThreshold")) <= 10240 and 0 < int(log.findtext("keepFiles")) <= 10
    assert root.findtext("logpath") == r"C:\ProgramData\ektp-agent\logs"
    assert root.findtext("startmode") == "Automatic"
    assert re.fullmatch(r"\d+ sec", root.findtext("stoptimeout"))
    assert root.find("serviceaccount") is None, "LocalSystem unless the deployer opts in (README)"
    assert "<serviceaccount>" in (WINDOWS / "ektp-agent.xml").read_text(), "the LocalService option is shown"


def test_the_readme_gives_install_and_uninstall_steps_and_says_it_is_untested():
    text = (WINDOWS / "README.md").read_text()
    for step in ("ektp-agent.exe install", "ektp-agent.exe start", "ektp-agent.exe uninstall", "WinSW-x64.exe",
                 "github.com/winsw/winsw/releases", "pip install", "ektp-agent.exe\" check", "Install Python for all users"):
        assert step in text, step
    assert "Not tested on Windows" in text
