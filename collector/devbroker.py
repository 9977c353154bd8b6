"""A private Mosquitto on a free loopback port, for the test suite and `make demo`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if path is None:
        raise RuntimeError("mosquitto is not installed; run: sudo apt-get install -y mosquitto (or make test as root)")
    return path


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


class Mosquitto:
    """Starts mosquitto with a generated config; `stop()` and `start()` keep the same port.

    `tls` is (cafile, certfile, keyfile) for a TLS listener; `extra` is appended to the config.
    With `persistence`, sessions and queued messages survive stop()/start() (saved on SIGTERM).
    """

    def __init__(self, workdir: str | os.PathLike | None = None, port: int | None = None,
                 tls: tuple[str, str, str] | None = None, extra: str = "", anonymous: bool = True,
                 persistence: bool = False):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ektp-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.extra = extra
        self.anonymous = anonymous
        self.persistence = persistence
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def _config(self) -> str:
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 0",
            f"listener {self.port} {self.host}",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if self.tls:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "tls_version tlsv1.2"]
        lines += self._run_as()
        return "\n".join(lines) + "\n" + self.extra + "\n"

    def _run_as(self) -> list[str]:
        # Started as root, mosquitto would drop to its own user, which cannot reach a private
        # (0700) test directory to save persistence; this broker is loopback-only and short-lived.
        return ["user root"] if os.geteuid() == 0 else []

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self._config())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir)
        log.close()
        try:
            wait_for_port(self.host, self.port, timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self.log_path.read_text()[-2000:]}") from None
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
