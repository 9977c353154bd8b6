"""`ektp-agent check` on a whole fixture kit: every device in words a technician understands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from collector.upsemu import MegatecPty, MegatecUps
from conftest import ROOT

SYSFS = Path(__file__).resolve().parent / "fixtures" / "sysfs"
KIT_IDS = {
    "fingerprint": "05ba:000a",
    "iris": "1d6b:0104",
    "camera": "046d:082d",
    "signature_pad": "056a:00a2",
    "card_reader": "072f:90cc",
}


@pytest.fixture
def ups():
    emulator = MegatecPty(MegatecUps("mains")).start()
    yield emulator
    emulator.close()


def kit_config(tmp_path, tree, ups_port) -> Path:
    probes = {name: {"ids": [usb_id], "timeout": 5} for name, usb_id in KIT_IDS.items()}
    probes["ups"] = {"driver": "megatec", "port": ups_port, "timeout": 5}
    config = {
        "kit": {"kabupaten": "sintang", "kecamatan": "dedai", "id": "kit-1"},
        "broker": {"url": "mqtt://127.0.0.1:1"},
        "state_dir": str(tmp_path / "state"),
        "paths": {"sysfs": str(SYSFS / tree)},
        "probes": probes,
    }
    path = tmp_path / f"{tree}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def squeeze(text: str) -> str:
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


def check(config, *args):
    return subprocess.run([sys.executable, "-m", "agent", "check", "-c", str(config), *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_whole_kit_present(tmp_path, ups):
    done = check(kit_config(tmp_path, "all-present", ups.path))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("[OK]") and "Pemindai sidik jari: DigitalPersona" in lines[0]
    assert any(line.startswith("[OK]") and "Kamera:" in line for line in lines)
    assert any(line.startswith("[OK]") and "UPS: listrik PLN, masukan 226 V" in line for line in lines)
    assert "Semua pemeriksaan lulus." in lines
    assert "Perangkat USB lain yang terpasang (tidak ada di konfigurasi):" in lines
    assert any("05e3:0608" in line for line in lines), "the hub nobody configured is listed with its id"


def test_missing_fingerprint_reader_in_plain_indonesian(tmp_path, ups):
    done = check(kit_config(tmp_path, "fingerprint-missing", ups.path))
    assert done.returncode == 1
    assert "[TIDAK ADA] Pemindai sidik jari tidak terdeteksi" in squeeze(done.stdout)
    assert done.stdout.splitlines()[-1] != "Semua pemeriksaan lulus."
    assert "1 bermasalah: fingerprint" in done.stdout
    english = check(kit_config(tmp_path, "fingerprint-missing", ups.path), "--lang", "en")
    assert "[MISSING] Fingerprint scanner not detected" in squeeze(english.stdout)


def test_iris_without_driver_and_ups_on_battery(tmp_path, ups):
    ups.ups.set_mode("mains_failure")
    done = check(kit_config(tmp_path, "iris-no-driver", ups.path), "--json")
    doc = json.loads(done.stdout)
    assert done.returncode == 1
    assert doc["probes"]["iris"]["state"] == "error" and doc["probes"]["iris"]["c"] == "driver_not_bound"
    assert doc["probes"]["iris"]["text"].startswith("terpasang tetapi tidak ada driver yang aktif")
    assert doc["probes"]["ups"]["state"] == "warn" and doc["probes"]["ups"]["on_batt"] is True
    assert doc["probes"]["ups"]["text"].startswith("UPS memakai baterai (listrik PLN padam)")
