"""A simulated fleet on the real code paths: one real agent process per kit, with its devices
simulated below the probe layer only.

Each kit gets a sysfs tree (the USB devices of a recording kit) that can be edited while the
agent runs (unplug, replug, unbind a driver), a Megatec UPS emulator on a pty, and a TCP
listener standing in for the district server, whose silence the link probe notices. Nothing
above the sysfs root, the serial port and the socket is simulated. Used by `make demo`, the
tests and the benchmarks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from collector.devbroker import free_port
from collector.upsemu import MegatecPty, MegatecUps

CONTROLLER = "devices/pci0000:00/0000:00:14.0"

# device -> (sysfs path under the controller, attributes, {interface: driver or None}). Ids and
# names from config/devices.yaml (usb.ids); the iris unit stands in with a Linux USB gadget id
# because usb.ids lists no iris scanner. Serial numbers get the kit's suffix.
KIT_DEVICES: dict[str, tuple[str, dict[str, str], dict[str, str | None]]] = {
    "root_hub": ("usb1", {"idVendor": "1d6b", "idProduct": "0002", "manufacturer": "Linux 6.1.0 xhci-hcd",
                          "product": "xHCI Host Controller", "serial": "0000:00:14.0"}, {"1-0:1.0": "hub"}),
    "hub": ("usb1/1-1", {"idVendor": "05e3", "idProduct": "0608", "product": "USB2.0 Hub"}, {"1-1:1.0": "hub"}),
    "fingerprint": ("usb1/1-1/1-1.1", {"idVendor": "05ba", "idProduct": "000a", "manufacturer": "DigitalPersona, Inc.",
                                       "product": "Fingerprint Reader", "serial": "TEST-FP-{n}"},
                    {"1-1.1:1.0": "usbfs"}),
    "iris": ("usb1/1-1/1-1.2", {"idVendor": "1d6b", "idProduct": "0104", "manufacturer": "Linux Foundation",
                                "product": "Iris scanner stand-in", "serial": "TEST-IRIS-{n}"},
             {"1-1.2:1.0": "usbfs"}),
    "camera": ("usb1/1-1/1-1.3", {"idVendor": "046d", "idProduct": "082d", "manufacturer": "Logitech, Inc.",
                                  "product": "HD Pro Webcam C920", "serial": "TEST-CAM-{n}"},
               {"1-1.3:1.0": "uvcvideo", "1-1.3:1.1": "uvcvideo", "1-1.3:1.2": "snd-usb-audio",
                "1-1.3:1.3": "snd-usb-audio"}),
    # no serial attribute: many signature pads and readers have none
    "signature_pad": ("usb1/1-1/1-1.4", {"idVendor": "056a", "idProduct": "00a2", "manufacturer": "Wacom Co., Ltd",
                                         "product": "STU-300B [LCD signature pad]"}, {"1-1.4:1.0": "usbhid"}),
    "card_reader": ("usb1/1-2", {"idVendor": "072f", "idProduct": "90cc", "manufacturer": "Advanced Card Systems, Ltd",
                                 "product": "ACR38 SmartCard Reader"}, {"1-2:1.0": "usbfs"}),
}
DEVICE_IDS = {
    name: f"{attrs['idVendor']}:{attrs['idProduct']}"
    for name, (_, attrs, _) in KIT_DEVICES.items() if name not in ("root_hub", "hub")
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def build_sysfs(root: Path, drop: tuple[str, ...] | set[str] = (), unbind: tuple[str, ...] | set[str] = (),
                serial: str = "0001") -> None:
    """Writes a sysfs tree like a real /sys: device directories under their hub, relative links
    in bus/usb/devices, each interface's `driver` link into bus/usb/drivers."""
    if root.exists():
        shutil.rmtree(root)
    drivers = root / "bus/usb/drivers"
    for driver in sorted({"usb"} | {d for _, _, ifs in KIT_DEVICES.values() for d in ifs.values() if d}):
        _write(drivers / driver / "uevent", "")
    for name, (path, attrs, interfaces) in KIT_DEVICES.items():
        if name in drop:
            continue
        device = root / CONTROLLER / path
        for attr, value in attrs.items():
            _write(device / attr, value.format(n=serial))
        _write(device / "bConfigurationValue", "1")
        _link(device / "driver", drivers / "usb")
        _link(root / "bus/usb/devices" / device.name, device)
        for number, (interface, driver) in enumerate(interfaces.items()):
            _write(device / interface / "bInterfaceNumber", f"{number:02x}")
            if driver and name not in unbind:
                _link(device / interface / "driver", drivers / driver)
            _link(root / "bus/usb/devices" / interface, device / interface)


class SysfsKit:
    """A kit's USB devices, editable while an agent reads them: every change builds a new tree
    and swaps a symlink atomically, so a probe never sees half a change."""

    def __init__(self, directory: Path, serial: str):
        self.directory = directory
        self.serial = serial
        self.root = directory / "sysfs"  # what the agent's paths.sysfs points at
        self.unplugged: set[str] = set()
        self.unbound: set[str] = set()
        self.generation = 0
        self._lock = threading.Lock()
        self._publish()

    def _publish(self) -> None:
        self.generation += 1
        tree = self.directory / f"tree-{self.generation}"
        build_sysfs(tree, self.unplugged, self.unbound, self.serial)
        link = self.directory / f".sysfs-{self.generation}"
        link.symlink_to(tree.name)
        os.replace(link, self.root)
        old = self.directory / f"tree-{self.generation - 2}"
        if old.exists():  # keep the previous tree: a probe may still be reading it
            shutil.rmtree(old)

    def change(self, unplug: tuple[str, ...] = (), plug: tuple[str, ...] = (), unbind: tuple[str, ...] = (),
               bind: tuple[str, ...] = ()) -> None:
        with self._lock:
            self.unplugged = (self.unplugged | set(unplug)) - set(plug)
            self.unbound = (self.unbound | set(unbind)) - set(bind)
            self._publish()


class DistrictServer:
    """A TCP listener standing in for the district server; close() makes the link probe fail."""

    def __init__(self):
        self.port = free_port()
        self.sock: socket.socket | None = None
        self.open()

    def open(self) -> None:
        if self.sock is not None:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        self.sock = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    @staticmethod
    def _accept(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
            except OSError:
                pass
            self.sock.close()
            self.sock = None


@dataclass
class SimKit:
    kabupaten: str
    kecamatan: str
    kit: str
    directory: Path
    serial: str
    devices: SysfsKit = field(init=False)
    ups: MegatecUps = field(init=False)
    ups_port: MegatecPty = field(init=False)
    district: DistrictServer = field(init=False)
    proc: subprocess.Popen | None = None
    config_path: Path | None = None

    def __post_init__(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        self.devices = SysfsKit(self.directory, self.serial)
        self.ups = MegatecUps("mains")
        self.ups_port = MegatecPty(self.ups).start()
        self.district = DistrictServer()

    @property
    def name(self) -> str:
        return f"{self.kabupaten}/{self.kecamatan}/{self.kit}"

    def write_config(self, broker_url: str, heartbeat: int = 60, interval: float = 2.0, **broker) -> Path:
        probes = {name: {"ids": [usb_id], "interval": interval, "timeout": interval}
                  for name, usb_id in DEVICE_IDS.items()}
        probes["ups"] = {"driver": "megatec", "port": self.ups_port.path, "interval": max(interval, 5.0),
                         "timeout": 5.0}  # the first run also asks for the rating and model
        probes["link"] = {"interval": interval, "timeout": interval, "count": 1, "attempt_timeout": 0.5,
                          "targets": {"district": {"host": "127.0.0.1", "port": self.district.port}}}
        probes["host"] = {"interval": max(interval, 10.0), "temperatures": False}
        config = {
            "kit": {"kabupaten": self.kabupaten, "kecamatan": self.kecamatan, "id": self.kit},
            "broker": {"url": broker_url, "will_delay": 2, "keepalive": 10, "reconnect_max_delay": 5, **broker},
            "heartbeat": heartbeat,
            "state_dir": str(self.directory / "state"),
            "paths": {"sysfs": str(self.devices.root)},
            "probes": probes,
        }
        self.config_path = self.directory / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.directory / "agent.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.ups_port.close()
        self.district.close()


class SimFleet:
    """Several SimKits; `close()` ends every process and emulator it started."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.kits: dict[str, SimKit] = {}

    def add(self, kabupaten: str, kecamatan: str, kit: str) -> SimKit:
        serial = f"{len(self.kits) + 1:04d}"
        sim = SimKit(kabupaten, kecamatan, kit, self.directory / "kits" / f"{kecamatan}-{kit}", serial)
        self.kits[sim.name] = sim
        return sim

    def __getitem__(self, name: str) -> SimKit:
        return self.kits[name]

    def pids(self) -> list[int]:
        return [k.proc.pid for k in self.kits.values() if k.proc is not None and k.proc.poll() is None]

    def close(self) -> None:
        for kit in self.kits.values():
            if kit.proc is not None and kit.proc.poll() is None:
                kit.proc.terminate()
        for kit in self.kits.values():
            kit.close()
