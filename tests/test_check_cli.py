"""`ektp-agent check` as a technician runs it: words, JSON and exit codes."""

import json
import os
import subprocess
import sys

from collector.devbroker import free_port
from conftest import ROOT, write_agent_config


def run_check(config, *args):
    return subprocess.run([sys.executable, "-m", "agent", "check", "-c", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_all_good_in_indonesian(tmp_path, tcp_target):
    cfg = write_agent_config(tmp_path / "a.yaml", None, tmp_path / "state", target_port=tcp_target.port)
    done = run_check(cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("[OK]") and "Komputer (PC):" in lines[0]
    assert "Jaringan:" in lines[1] and "district terhubung" in lines[1]
    assert lines[-1] == "Semua pemeriksaan lulus."


def test_failing_link_exits_non_zero_and_says_why(tmp_path):
    cfg = write_agent_config(tmp_path / "a.yaml", None, tmp_path / "state", target_port=free_port())
    done = run_check(cfg)
    assert done.returncode == 1
    assert "[GAGAL]" in done.stdout
    assert "Jaringan: tidak ada jawaban dari server tujuan: district: Connection refused" in done.stdout
    assert done.stdout.splitlines()[-1] == "1 bermasalah: link"
    english = run_check(cfg, "--lang", "en")
    assert english.returncode == 1
    assert "[FAILED]" in english.stdout and "Network link: no answer from any target" in english.stdout


def test_warning_alone_exits_zero(tmp_path, tcp_target):
    cfg = write_agent_config(tmp_path / "a.yaml", None, tmp_path / "state", target_port=tcp_target.port,
                             probes={"host": {"disk_free_min": 1.0, "temperatures": False}})
    done = run_check(cfg)
    assert done.returncode == 0
    assert "[PERHATIAN]" in done.stdout and "ruang disk hampir habis: /" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("Tidak ada yang gagal, tetapi perlu perhatian: host")


def test_json_for_machines(tmp_path):
    cfg = write_agent_config(tmp_path / "a.yaml", None, tmp_path / "state", target_port=free_port())
    done = run_check(cfg, "--json", "--lang", "en")
    doc = json.loads(done.stdout)
    assert doc["kit"] == "sintang/dedai/kit-1"
    assert doc["ok"] is False
    assert doc["probes"]["link"]["state"] == "error"
    assert doc["probes"]["link"]["c"] == "no_answer"
    assert doc["probes"]["host"]["mem_total"] > 0
    assert doc["probes"]["link"]["text"].startswith("no answer")


def test_config_error_exits_2_naming_file_and_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kit: {kabupaten: sintang, kecamatan: dedai}\nbroker: {url: 'mqtts://x'}\nprobes: {host: {}}\n")
    done = run_check(cfg)
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"{cfg}: kit.id: required key is missing" in done.stderr
    assert "Traceback" not in done.stderr
