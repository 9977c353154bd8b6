"""What every benchmark shares: figures, the machine, process readings, a collector process,
a broker with the district settings, and a full kit's report."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from agent import wire
from collector.devbroker import Mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Figure:
    """One measured figure: the median of `runs`, its goal and the peer's value in the same run."""

    key: str
    label: str
    value: float | None
    unit: str
    goal: str = ""  # in words, e.g. "<= node_exporter's RSS"
    ok: bool | None = None  # None: no goal (information)
    peer: str = ""  # the peer's figure measured in the same run, with its name
    runs: list = field(default_factory=list)
    why: str = ""  # for a missed goal: the measured reason
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Ctx:
    """What a benchmark gets: quick or full, how many runs, a scratch directory, a logger."""

    def __init__(self, quick: bool, runs: int, workdir: Path, log=print):
        self.quick = quick
        self.runs = runs
        self.workdir = workdir
        self.log = log
        self.notes: list[str] = []  # free text for the benchmark's section
        self.extra: dict = {}  # free-form details kept in latest.json

    def tmp(self, name: str) -> Path:
        path = self.workdir / name
        n = 1
        while path.exists():
            n += 1
            path = self.workdir / f"{name}-{n}"
        path.mkdir(parents=True)
        return path

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.log("  note: " + text)


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit in ("MB", "ms", "s", "%", "KB") or isinstance(value, float):
        text = f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    else:
        text = f"{value:,}"
    return f"{text} {unit}".strip()


# -- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def package_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine() -> dict:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    import msgspec
    import paho.mqtt

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gb": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": loadavg(),
        "paho_mqtt": paho.mqtt.__version__,
        "msgspec": msgspec.__version__,
        "packages": {p: package_version(p) for p in ("mosquitto", "prometheus-node-exporter",
                                                      "prometheus-mqtt-exporter")},
    }


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.path.exists(p)),
                                      None)


# -- process readings -------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kb(value: str) -> int:
    return int(value.split()[0]) * 1024


def rss_bytes(pid: int) -> int:
    return _kb(proc_status(pid)["VmRSS"])


def memory(pid: int) -> dict[str, int]:
    """RSS and its parts (anonymous: the process's own heap and stacks; file: mapped code and
    libraries, mostly shared with other processes), and the thread count."""
    status = proc_status(pid)
    return {"rss": _kb(status["VmRSS"]), "anon": _kb(status.get("RssAnon", "0 kB")),
            "file": _kb(status.get("RssFile", "0 kB")), "hwm": _kb(status.get("VmHWM", "0 kB")),
            "threads": int(status.get("Threads", "0"))}


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 60.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def timed_get(url: str, timeout: float = 60.0) -> tuple[float, bytes]:
    start = time.perf_counter()
    status, body = http_get(url, timeout)
    elapsed = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}")
    return elapsed, body


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The first sample of `name` whose labels include `labels` (plain text parsing)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric = head.split("{", 1)[0]
        if metric != name:
            continue
        if all(w in head for w in want):
            return float(value)
    return None


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- broker ---------------------------------------------------------------------------------


class DistrictMosquitto(Mosquitto):
    """The test broker with the queue and in-flight limits of config/mosquitto/mosquitto.conf
    (max_queued_messages 500000, max_inflight_messages left at Mosquitto's default of 20), so a
    flood is neither dropped by a test-sized queue nor helped by a larger window than a district
    broker has. `inflight` overrides the window."""

    def __init__(self, *args, inflight: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.inflight = inflight

    def _config(self) -> str:
        lines = []
        for line in super()._config().splitlines():
            if line.startswith("max_queued_messages"):
                line = "max_queued_messages 500000"
            elif line.startswith("max_inflight_messages"):
                line = f"max_inflight_messages {self.inflight}" if self.inflight is not None else ""
            elif line.startswith(("connection_messages", "log_type information")):
                line = ""  # thousands of connects are not worth a log line each
            lines.append(line)
        return "\n".join(lines) + "\n"


# -- the collector in its own process ---------------------------------------------------------


def write_collector_config(path: Path, broker: Mosquitto, store: Path, http_port: int, **overrides) -> Path:
    config = {
        "broker": {"url": broker.url, "client_id": f"bench-{path.stem}", "keepalive": 30},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "store": {"path": str(store)},
        "log_level": "warning",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class CollectorProcess:
    """`python -m collector run -c CONFIG` as its own process."""

    def __init__(self, workdir: Path, broker: Mosquitto, name: str = "collector", **overrides):
        self.workdir = workdir
        self.port = free_port()
        self.config = write_collector_config(workdir / f"{name}.yaml", broker, workdir / f"{name}.sqlite",
                                             self.port, **overrides)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> "CollectorProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([PYTHON, "-m", "collector", "run", "-c", str(self.config)], cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(self._healthy, timeout, 0.05, "the collector to connect")
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the collector exited: {self.log()[-2000:]}")
        try:
            return http_get(self.url + "/healthz", 2)[0] == 200
        except OSError:
            return False

    def metrics(self) -> str:
        return http_get(self.url + "/metrics")[1].decode()

    def received(self) -> float:
        return metric_value(self.metrics(), "ektp_collector_messages_received_total") or 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.proc = None


# -- a full kit's report --------------------------------------------------------------------


def kit_ids(n: int) -> list[wire.KitId]:
    """n distinct kits: 50 per kabupaten, 25 kecamatan of two kits each."""
    return [wire.KitId(f"kab-{i // 50:03d}", f"kec-{(i % 50) // 2:02d}", f"kit-{i % 2 + 1}") for i in range(n)]


def full_report(kit: wire.KitId, seq: int, ts: float, boot: str, serial: int = 1) -> wire.Report:
    """A report of a kit with every probe, as a SimKit agent sends it (bench/README.md)."""
    sn = f"{serial:05d}"

    def dev(vid, pid, vendor, product, bus, driver, serial_number=None):
        return wire.DeviceEntry(s="ok", vid=vid, pid=pid, vendor=vendor, product=product, serial=serial_number,
                                bus=bus, driver=driver, count=1)

    entries = {
        "fingerprint": dev("05ba", "000a", "DigitalPersona, Inc.", "Fingerprint Reader", "1-1.1", "usbfs",
                           f"FP-{sn}"),
        "iris": dev("1d6b", "0104", "Linux Foundation", "Iris scanner stand-in", "1-1.2", "usbfs", f"IRIS-{sn}"),
        "camera": dev("046d", "082d", "Logitech, Inc.", "HD Pro Webcam C920", "1-1.3", "snd-usb-audio,uvcvideo",
                      f"CAM-{sn}"),
        "signature_pad": dev("056a", "00a2", "Wacom Co., Ltd", "STU-300B [LCD signature pad]", "1-1.4", "usbhid"),
        "card_reader": dev("072f", "90cc", "Advanced Card Systems, Ltd", "ACR38 SmartCard Reader", "1-2", "usbfs"),
        "ups": wire.UpsEntry(s="ok", on_batt=False, batt_low=False, failed=False, test=False, shutdown=False,
                             bypass=False, load=0.14 + (seq % 7) / 100, in_v=226.0 - seq % 5, out_v=226.0,
                             in_hz=50.0, batt_v=27.4, temp=30.0, charge=1.0, vendor="EMULATED UPS",
                             model="MEGA-1000", via="megatec"),
        "link": wire.LinkEntry(s="ok", targets={"district": wire.LinkTarget(up=True, rtt=0.012 + (seq % 9) / 1000,
                                                                             sent=seq, recv=seq)}),
        "host": wire.HostEntry(s="ok", cpu=round((seq % 13) / 20, 3), mem_avail=3_100_000_000 - seq * 4096,
                               mem_total=8_254_793_984, disks={"/": wire.Disk(85_002_477_568 - seq * 4096,
                                                                              270_553_174_016)},
                               boot=ts - 3600.0),
    }
    return wire.Report(v=1, kab=kit.kabupaten, kec=kit.kecamatan, kit=kit.kit, ts=round(ts, 3), boot=boot, seq=seq,
                       hb=60, p=entries, q=wire.QueueStats(0, 0))


def status_online(boot: str, ts: float) -> wire.Status:
    return wire.Status(v=1, state="online", boot=boot, ts=round(ts, 3), agent="0.1.0", connects=1, hb=60,
                       host="kit-pc", os="linux 6.1.0")


def boot_id(i: int, salt: int = 0) -> str:
    return f"{salt:08x}{i:08x}"


def mb(n: float) -> float:
    return n / 1e6


def env_python_rss(code: str) -> dict:
    """Memory of a fresh interpreter (this venv's python) after running `code`."""
    script = code + "\nimport sys\nsys.stdout.write(open('/proc/self/status').read())\n"
    out = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    status = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return {"rss": _kb(status["VmRSS"]), "anon": _kb(status["RssAnon"]), "file": _kb(status["RssFile"])}


_SAFE = re.compile(r"[^a-z0-9_]+")


def slug(text: str) -> str:
    return _SAFE.sub("_", text.lower()).strip("_")
