"""`make demo`: Kabupaten Sintang's 14 kecamatan, two kits each, on the real code paths.

A private Mosquitto, the collector (`ektp-collector run`), a local SMTP catcher that saves each
email as a file, and one real agent process per kit whose devices are simulated below the probe
layer (collector/simfleet.py). A scenario plays out over a few minutes: most kits start broken
as in the Sintang report (11 of 14 kecamatan down), a fingerprint reader is unplugged and
replugged, a kecamatan loses mains power, a link flaps, a broken kit is repaired. Runs until
Ctrl-C, or DEMO_SECONDS seconds; every process it started is ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from collector.devbroker import Mosquitto, free_port
from collector.simfleet import SimFleet

KABUPATEN = "sintang"
# Sintang's 14 kecamatan (../shared/CONTEXT.md). Coordinates are ILLUSTRATIVE, spread around
# Sintang town for the nearest-kecamatan hint; they are not surveyed positions.
KECAMATAN = {
    "ambalau": ("Ambalau", -0.55, 113.05), "binjai-hulu": ("Binjai Hulu", 0.05, 111.45),
    "dedai": ("Dedai", -0.05, 111.25), "kayan-hilir": ("Kayan Hilir", -0.25, 111.95),
    "kayan-hulu": ("Kayan Hulu", -0.45, 112.35), "kelam-permai": ("Kelam Permai", 0.05, 111.75),
    "ketungau-hilir": ("Ketungau Hilir", 0.55, 111.55), "ketungau-hulu": ("Ketungau Hulu", 1.05, 112.05),
    "ketungau-tengah": ("Ketungau Tengah", 0.85, 111.85), "sepauk": ("Sepauk", -0.15, 111.05),
    "serawai": ("Serawai", -0.55, 112.55), "sintang": ("Sintang", 0.07, 111.50),
    "sungai-tebelian": ("Sungai Tebelian", -0.05, 111.35), "tempunak": ("Tempunak", -0.25, 111.15),
}
# Only Sintang, Dedai and Serawai (sometimes) record, as in the news report; the others start
# with the faults below (kit-1, kit-2). "dead": the PC does not run at all.
FAULTS = {
    "ambalau": ({"unplug": ("iris",)}, "dead"),
    "binjai-hulu": ({"unplug": ("fingerprint",)}, {"unplug": ("camera",)}),
    "kayan-hilir": ({"unbind": ("iris",)}, {"unplug": ("signature_pad",)}),
    "kayan-hulu": ("dead", "dead"),
    "kelam-permai": ({"unplug": ("camera", "iris")}, {"unplug": ("fingerprint",)}),
    "ketungau-hilir": ({"unplug": ("iris",)}, {"unbind": ("camera",)}),
    "ketungau-hulu": ({"unplug": ("fingerprint", "card_reader")}, "dead"),
    "ketungau-tengah": ({"unplug": ("signature_pad",)}, {"unplug": ("iris",)}),
    "sepauk": ({"unplug": ("iris",)}, {"unplug": ("fingerprint",)}),
    "sungai-tebelian": ({"unbind": ("fingerprint",)}, {"unplug": ("camera",)}),
    "tempunak": ({"unplug": ("iris",)}, {"unplug": ("iris",)}),
    "serawai": (None, {"unplug": ("iris",)}),
}


class MailCatcher:
    """An SMTP server on loopback that saves every email it receives as a .eml file."""

    def __init__(self, directory: Path):
        from aiosmtpd.controller import Controller

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.count = 0
        self._lock = threading.Lock()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            self.count += 1
            name = self.directory / f"{self.count:03d}-{envelope.rcpt_tos[0]}.eml"
        name.write_bytes(envelope.content)
        return "250 OK"

    def start(self):
        self.controller.start()

    def stop(self):
        self.controller.stop()


def collector_config(workdir: Path, broker: Mosquitto, mail_port: int, http_port: int) -> Path:
    config = {
        "broker": {"url": broker.url, "client_id": "ektp-collector-demo"},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "store": {"path": str(workdir / "collector.sqlite")},
        "fleet": {"required_devices": ["fingerprint", "iris", "camera", "signature_pad"]},
        "inventory": {KABUPATEN: {"name": "Kabupaten Sintang", "kecamatan": {
            kec: {"name": name, "lat": lat, "lon": lon, "kits": ["kit-1", "kit-2"]}
            for kec, (name, lat, lon) in KECAMATAN.items()}}},
        # hold-downs shortened so the scenario fits in minutes
        "alerts": {
            "smtp": {"host": "127.0.0.1", "port": mail_port, "security": "none",
                     "from_address": "ektp-monitor@disdukcapil-sintang.example"},
            "recipients": {"everywhere": ["it@disdukcapil-sintang.example"],
                           "kabupaten": {KABUPATEN: ["kasi-pelayanan@disdukcapil-sintang.example"]}},
            "kit_down": {"hold": 15, "recover": 10}, "power": {"hold": 5, "recover": 10},
            "link": {"hold": 30, "recover": 10}, "stale": {"hold": 30, "repeat": 86400},
            "digest_window": 10, "evaluate_every": 1,
        },
    }
    path = workdir / "collector.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def scenario(fleet: SimFleet, stop: threading.Event, started: float, log) -> None:
    """The events of the demo, at seconds after start."""
    kit = lambda kec, n=1: fleet[f"{KABUPATEN}/{kec}/kit-{n}"]  # noqa: E731
    steps = [
        (20, "Kec. Dedai kit-1: pemindai sidik jari dicabut (fingerprint reader unplugged)",
         lambda: kit("dedai").devices.change(unplug=("fingerprint",))),
        (30, "Kec. Serawai: listrik PLN padam, UPS memakai baterai (mains failure)",
         lambda: [kit("serawai", n).ups.set_mode("mains_failure") for n in (1, 2)]),
        (60, "Kec. Sepauk kit-1 diperbaiki: pemindai iris dipasang lagi (repaired)",
         lambda: kit("sepauk").devices.change(plug=("iris",))),
        (75, "Kec. Serawai: baterai UPS hampir habis (battery low)",
         lambda: [kit("serawai", n).ups.set_mode("battery_low") for n in (1, 2)]),
        (90, "Kec. Dedai kit-1: pemindai sidik jari dipasang lagi (replugged)",
         lambda: kit("dedai").devices.change(plug=("fingerprint",))),
        (110, "Kec. Serawai: listrik PLN kembali (mains back)",
         lambda: [kit("serawai", n).ups.set_mode("mains") for n in (1, 2)]),
    ]
    flapping = kit("sintang", 2).district
    for at, text, action in steps:
        while not stop.is_set() and time.monotonic() - started < at:
            elapsed = time.monotonic() - started
            # Kec. Sintang kit-2's link flaps every 8 s between 25 s and 100 s
            if 25 <= elapsed < 100 and int(elapsed // 8) % 2:
                flapping.close()
            else:
                flapping.open()
            stop.wait(0.5)
        if stop.is_set():
            return
        action()
        log(f"  >> {text}")
    flapping.open()


def summary(api: str, started: float, mail: MailCatcher, urls: list[str]) -> str:
    with urllib.request.urlopen(api + "/api/fleet", timeout=5) as response:
        kits = json.load(response)["kits"]
    by_kec: dict[str, dict[str, dict]] = {}
    for k in kits:
        by_kec.setdefault(k["kecamatan"], {})[k["kit"]] = k

    def cell(k: dict | None) -> str:
        if k is None:
            return "-"
        if k["ready"]:
            return "SIAP"
        if not k["online"]:
            return "OFFLINE"
        return "TIDAK SIAP: " + ",".join(k["not_ready_because"])

    lines = [f"ektp-monitor demo: Kabupaten Sintang, {time.monotonic() - started:.0f} s", *urls, "",
             f"{'Kecamatan':<17} {'kit-1':<30} {'kit-2':<30}"]
    for kec in sorted(by_kec):
        row = by_kec[kec]
        lines.append(f"{KECAMATAN.get(kec, (kec,))[0]:<17} {cell(row.get('kit-1')):<30.30} {cell(row.get('kit-2')):<30.30}")
    ready_kits = sum(k["ready"] for k in kits)
    ready_kec = sum(any(k["ready"] for k in row.values()) for row in by_kec.values())
    lines += ["", f"Siap merekam (ready): {ready_kits}/{len(kits)} kits, {ready_kec}/{len(by_kec)} kecamatan; "
                  f"emails: {mail.count} in {mail.directory}"]
    return "\n".join(lines)


def run(seconds: float | None = None, workdir: Path | None = None) -> int:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ektp-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    broker = Mosquitto(workdir / "broker")
    mail = MailCatcher(workdir / "mail")
    fleet = SimFleet(workdir)
    collector: subprocess.Popen | None = None
    prometheus = None
    tty = sys.stdout.isatty()
    messages: list[str] = []

    def log(text: str) -> None:
        messages.append(text)
        if not tty:
            print(text, flush=True)

    try:
        broker.start()
        mail.start()
        http_port = free_port()
        api = f"http://127.0.0.1:{http_port}"
        config = collector_config(workdir, broker, mail.port, http_port)
        with open(workdir / "collector.log", "ab") as out:
            collector = subprocess.Popen([sys.executable, "-m", "collector", "run", "-c", str(config)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for kec in KECAMATAN:
            for n in (1, 2):
                sim = fleet.add(KABUPATEN, kec, f"kit-{n}")
                sim.write_config(broker.url, heartbeat=10, interval=2.0)
                fault = FAULTS.get(kec, (None, None))[n - 1]
                if fault == "dead":
                    continue  # this PC never comes up
                if fault:
                    sim.devices.change(**fault)
                sim.start()
        urls = [f"  metrics: {api}/metrics", f"  fleet:   {api}/api/fleet", f"  health:  {api}/healthz",
                f"  emails:  {workdir / 'mail'}", f"  files:   {workdir}"]
        try:
            from collector.devprometheus import Prometheus, find_prometheus

            find_prometheus()
            prometheus = Prometheus([f"127.0.0.1:{http_port}"], workdir=workdir / "prometheus", interval="5s").start()
            urls.append(f"  prometheus: {prometheus.url}/graph (try: ektp_kit_ready)")
        except RuntimeError:
            urls.append("  prometheus: not installed (apt-get install prometheus), skipped")
        print("\n".join(["ektp-monitor demo is running:", *urls, "",
                         f"{len(fleet.pids())} agents started; " +
                         (f"stopping after {seconds:g} s" if seconds else "Ctrl-C stops")]), flush=True)
        started = time.monotonic()
        threading.Thread(target=scenario, args=(fleet, stop, started, log), daemon=True).start()
        deadline = started + seconds if seconds else None
        last_print = 0.0
        warned = False
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if not warned and time.monotonic() - started > 5:
                warned = True
                for sim in fleet.kits.values():
                    if sim.proc is not None and sim.proc.poll() is not None:
                        tail = (sim.directory / "agent.log").read_text(errors="replace").strip().splitlines()[-1:]
                        print(f"agent {sim.name} exited: {' '.join(tail)}", file=sys.stderr, flush=True)
            if collector.poll() is not None:
                print(f"the collector stopped; see {workdir / 'collector.log'}", file=sys.stderr)
                return 1
            now = time.monotonic()
            if now - last_print >= (2 if tty else 15):
                try:
                    screen = summary(api, started, mail, urls)
                except OSError:
                    screen = "waiting for the collector..."
                if tty:
                    print("\x1b[H\x1b[2J" + screen + "\n\n" + "\n".join(messages[-6:]), flush=True)
                else:
                    print(screen + "\n", flush=True)
                last_print = now
            stop.wait(0.5)
        try:
            with urllib.request.urlopen(api + "/api/fleet", timeout=5) as response:
                (workdir / "final-fleet.json").write_bytes(response.read())
            print(summary(api, started, mail, urls), flush=True)
        except OSError:
            pass
        return 0
    finally:
        fleet.close()
        if collector is not None and collector.poll() is None:
            collector.terminate()
            try:
                collector.wait(15)
            except subprocess.TimeoutExpired:
                collector.kill()
        if prometheus is not None:
            prometheus.stop()
        mail.stop()
        broker.stop()
        print(f"demo stopped; every process it started has ended. Files are in {workdir}", flush=True)


def main() -> int:
    seconds = os.environ.get("DEMO_SECONDS")
    workdir = os.environ.get("DEMO_DIR")
    return run(float(seconds) if seconds else None, Path(workdir) if workdir else None)
