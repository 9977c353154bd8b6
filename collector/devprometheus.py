"""A private Prometheus scraping the collector, for the test suite and `make demo`."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from collector.devbroker import free_port


def find_prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise RuntimeError("prometheus is not installed; run: sudo apt-get install -y prometheus (or make test as root)")
    return path


class Prometheus:
    def __init__(self, targets: list[str], workdir: str | Path | None = None, interval: str = "1s",
                 rule_files: list[str] | None = None, scheme: str = "http", extra_scrape: dict | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ektp-prometheus-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        job = {"job_name": "ektp-collector", "scrape_interval": interval, "scheme": scheme,
               "static_configs": [{"targets": targets}], **(extra_scrape or {})}
        self.config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": rule_files or [],
            "scrape_configs": [job],
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "prometheus.log"

    def start(self, timeout: float = 30.0) -> "Prometheus":
        conf = self.workdir / "prometheus.yml"
        conf.write_text(yaml.safe_dump(self.config))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [find_prometheus(), f"--config.file={conf}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def query(self, expr: str) -> list[dict]:
        doc = self.api("query", query=expr)
        if doc.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {doc}")
        return doc["data"]["result"]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
