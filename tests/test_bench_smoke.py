"""The benchmarks (`make bench`) run once each at a tiny size, so they keep working.

This checks that every benchmark produces its figures, not how fast anything is: speed is for
`make bench` and bench/results/latest.md.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ["footprint", "wire", "ingest", "scrape", "latency"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_at_a_tiny_size(name, tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", name, "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert doc["quick"] is True and doc["machine"]["nproc"] >= 1
    section = doc["benchmarks"][name]
    assert not section.get("error"), section.get("error")
    figures = section["figures"]
    assert figures, f"{name} produced no figures"
    for figure in figures:
        value = figure["value"]
        assert isinstance(value, (int, float)) and math.isfinite(value), figure
        if figure["goal"]:
            assert figure["ok"] in (True, False), figure
            assert figure["ok"] or figure["why"], f"a missed goal must say why: {figure}"
    table = (tmp_path / "latest.md").read_text()
    assert "| Benchmark | Figure | Value | Goal | Peer (same run) | Result |" in table
    assert figures[0]["label"].replace("|", "\\|") in table
