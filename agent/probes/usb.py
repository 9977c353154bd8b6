"""usb: is a USB device of the kit plugged in and bound to a driver (fingerprint, iris, signature pad).

Linux reads sysfs; Windows asks Plug and Play through PowerShell. Each side is split into a reader
that touches the system and a pure parser, and one pure `evaluate` turns the device list into a
report entry, so the logic is tested on fixture trees and JSON without the hardware.
The camera and card_reader probes build on this one.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Annotated, Any, Callable, Iterable, Literal

from msgspec import Meta, Struct, structs

from agent import wire
from agent.probes.base import Probe

# "vvvv:pppp" as lsusb prints it. Upper case is accepted too, because Device Manager shows
# VID_05BA&PID_000A and technicians copy that; ids are lower-cased before use.
USB_ID_PATTERN = r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$"
UsbId = Annotated[str, Meta(pattern=USB_ID_PATTERN)]

POWERSHELL_TIMEOUT = 8.0  # seconds; below the default probe timeout of 10 s
# Linux: the kit's USB probes usually run at the same moment, and each needs the whole device
# list. One of them reads sysfs and the others take its listing if it began at most this many
# seconds before they asked, instead of reading the same files again (see ListingCache).
SYSFS_SHARE = 0.25

# Present and absent ("phantom") USB devices with their problem code; phantoms are dropped in
# parse_pnp_json. Win32_PnPEntity is used rather than Get-PnpDevice because it exists on every
# Windows that runs Python 3.11 and gives the problem code as a plain number.
PNP_SCRIPT = (
    "[Console]::OutputEncoding = [Text.Encoding]::UTF8; "
    "Get-CimInstance -ClassName Win32_PnPEntity -Filter \"PNPDeviceID LIKE 'USB%'\" | "
    "Select-Object PNPDeviceID,Name,Manufacturer,Status,ConfigManagerErrorCode,Service,Present | "
    "ConvertTo-Json -Compress"
)
CM_PROB_PHANTOM = 45  # "not connected": Windows remembers the device, it is not plugged in


class UsbListError(Exception):
    """The USB devices could not be listed at all (as opposed to: the device is not there)."""


class UsbOptions(Struct, forbid_unknown_fields=True):
    # vendor:product ids as `lsusb` shows them ("05ba:000a"); a unit with any of them counts.
    ids: Annotated[list[UsbId], Meta(min_length=1, max_length=32)]
    # Serial number of this kit's own unit. Another unit is `warn` (lent or swapped), not a failure.
    serial: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    # Linux: a unit none of whose interfaces has a kernel driver is `error`. Set false for a device
    # that a user-space (libusb) program claims only while it runs: it has no driver in between.
    require_driver: bool = True
    platform: Literal["auto", "linux", "windows"] = "auto"


class UsbDevice(Struct, frozen=True, kw_only=True):
    """One USB device as either platform describes it."""

    vid: str  # 4 lower-case hex digits
    pid: str
    serial: str | None = None
    vendor: str | None = None  # Linux: the device's manufacturer string; Windows: the driver's
    product: str | None = None
    bus: str | None = None  # Linux sysfs name, e.g. "1-1.4"
    drivers: tuple[str, ...] = ()  # drivers bound to its interfaces (Windows: services)
    unbound: tuple[str, ...] = ()  # Linux: interfaces with no driver
    interfaces: int | None = None  # Linux: interfaces of the active configuration; None: unknown
    problem: int | None = None  # Windows problem code; 0: none
    status: str | None = None  # Windows status ("OK", "Error", ...)

    @property
    def usb_id(self) -> str:
        return f"{self.vid}:{self.pid}"


# ---------------------------------------------------------------------------------------------
# Linux: sysfs


class SysfsDevice(Struct):
    """One entry of bus/usb/devices as read from disk, not yet interpreted."""

    name: str  # "1-1.4", "usb1"
    attrs: dict[str, str]  # only the attributes that could be read
    interfaces: dict[str, str | None]  # "1-1.4:1.0" -> bound driver name, or None


SYSFS_ATTRS = ("idVendor", "idProduct", "serial", "manufacturer", "product")
_INTERFACE_DIR = re.compile(r"^\d+-[\d.]+:\d+\.\d+$")  # <bus>-<ports>:<config>.<interface>
_HEX4 = re.compile(r"[0-9a-f]{4}")


def _read_attr(path: str) -> str | None:
    # os.open/os.read rather than open(): no buffered file object for a few bytes, a third of the cost
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no such attribute, unplugged while reading, or not readable
        return None
    try:
        return os.read(fd, 4096).decode("utf-8", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_interfaces(device_dir: str) -> dict[str, str | None]:
    try:
        entries = sorted(os.listdir(device_dir))
    except OSError:
        return {}
    found: dict[str, str | None] = {}
    for entry in entries:
        if not _INTERFACE_DIR.match(entry):
            continue
        try:
            found[entry] = os.path.basename(os.readlink(os.path.join(device_dir, entry, "driver")))
        except OSError:  # no `driver` link: nothing is bound to this interface
            found[entry] = None
    return found


def read_sysfs_usb(sysfs_root: str) -> list[SysfsDevice]:
    """Reads <sysfs_root>/bus/usb/devices. Raises UsbListError only if the directory cannot be listed."""
    base = os.path.join(sysfs_root, "bus", "usb", "devices")
    try:
        names = sorted(os.listdir(base))
    except OSError as exc:
        raise UsbListError(f"cannot list {base}: {exc.strerror or exc}") from None
    devices = []
    for name in names:
        if ":" in name:  # an interface; read from inside its device below
            continue
        path = os.path.join(base, name)
        values = {attr: _read_attr(os.path.join(path, attr)) for attr in SYSFS_ATTRS}
        attrs = {attr: value for attr, value in values.items() if value is not None}
        devices.append(SysfsDevice(name, attrs, _read_interfaces(path)))
    return devices


def _text(value: Any) -> str | None:
    """A label for the wire: stripped, at most 64 characters, None when empty."""
    text = "" if value is None else str(value).strip()
    return text[:64] or None


def parse_sysfs(raw: Iterable[SysfsDevice]) -> list[UsbDevice]:
    devices = []
    for item in raw:
        vid = (item.attrs.get("idVendor") or "").strip().lower()
        pid = (item.attrs.get("idProduct") or "").strip().lower()
        if not (_HEX4.fullmatch(vid) and _HEX4.fullmatch(pid)):  # going away, or not a device directory
            continue
        devices.append(UsbDevice(
            vid=vid,
            pid=pid,
            serial=_text(item.attrs.get("serial")),
            vendor=_text(item.attrs.get("manufacturer")),
            product=_text(item.attrs.get("product")),
            bus=item.name[:64],
            drivers=tuple(sorted({drv for drv in item.interfaces.values() if drv})),
            unbound=tuple(name for name, drv in item.interfaces.items() if not drv),
            interfaces=len(item.interfaces),
        ))
    return devices


# ---------------------------------------------------------------------------------------------
# Windows: Plug and Play through PowerShell

# USB\VID_046D&PID_082D\<serial or generated id>; a function of a composite device adds &MI_xx.
_INSTANCE_ID = re.compile(r"^USB\\VID_([0-9A-F]{4})&PID_([0-9A-F]{4})(?:&MI_([0-9A-F]{2}))?\\(.+)$", re.IGNORECASE)


def _field(row: dict[str, Any], *names: str) -> Any:
    """The first of several spellings (Get-PnpDevice vs Win32_PnPEntity) that is present."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def _problem_code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        if value.strip().isdigit():
            return int(value)
        if value.strip().upper() == "CM_PROB_NONE":  # PowerShell 7 may print the enum name
            return 0
    return None


class _PnpRow(Struct, frozen=True):
    vid: str
    pid: str
    interface: str | None  # "00" for &MI_00, None for the device itself
    instance: str  # the last part of the instance id
    name: str | None
    manufacturer: str | None
    status: str | None
    problem: int | None
    service: str | None


def parse_pnp_json(text: str) -> list[UsbDevice]:
    """USB devices from the JSON that PNP_SCRIPT prints (or Get-PnpDevice piped to ConvertTo-Json)."""
    import json  # Windows only

    text = text.lstrip("\ufeff").strip()
    if not text:  # ConvertTo-Json prints nothing for no devices
        return []
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsbListError(f"PowerShell did not print JSON: {exc}") from None
    if isinstance(data, dict):  # ConvertTo-Json prints one object, not a list, for one device
        data = [data]
    if not isinstance(data, list):
        raise UsbListError(f"PowerShell printed JSON {type(data).__name__}, expected a list of devices")
    rows = []
    for row in data:
        if not isinstance(row, dict):
            continue
        match = _INSTANCE_ID.match(str(_field(row, "InstanceId", "PNPDeviceID", "DeviceID") or ""))
        if not match:  # hubs' USB\ROOT_HUB30, USBSTOR\..., anything else
            continue
        problem = _problem_code(_field(row, "Problem", "ConfigManagerErrorCode"))
        if _field(row, "Present") is False or problem == CM_PROB_PHANTOM:
            continue
        vid, pid, interface, instance = match.groups()
        rows.append(_PnpRow(
            vid=vid.lower(),
            pid=pid.lower(),
            interface=interface.upper() if interface else None,
            instance=instance,
            name=_text(_field(row, "FriendlyName", "Name")),
            manufacturer=_text(_field(row, "Manufacturer")),
            status=_text(_field(row, "Status")),
            problem=problem,
            service=_text(_field(row, "Service")),
        ))
    return _group_pnp(rows)


def _group_pnp(rows: list[_PnpRow]) -> list[UsbDevice]:
    """One UsbDevice per physical unit: a composite device's functions (&MI_xx) join their parent.

    The JSON does not say which parent a function belongs to, so with several units of one model
    the functions' problems count against each of them.
    """
    parents = [row for row in rows if row.interface is None]
    functions: dict[tuple[str, str], list[_PnpRow]] = {}
    for row in rows:
        if row.interface is not None:
            functions.setdefault((row.vid, row.pid), []).append(row)
    for key, funcs in functions.items():
        if not any((p.vid, p.pid) == key for p in parents):  # functions whose parent was not listed
            parents.append(structs.replace(funcs[0], interface=None))  # its instance id has no serial
    devices = []
    for parent in sorted(parents, key=lambda r: (r.vid, r.pid, r.instance)):
        funcs = sorted(functions.get((parent.vid, parent.pid), []), key=lambda r: r.interface or "")
        members = [parent, *funcs]
        problems = [r.problem for r in members if r.problem]
        statuses = [r.status for r in members if r.status and r.status.upper() != "OK"]
        devices.append(UsbDevice(
            vid=parent.vid,
            pid=parent.pid,
            # a serial number becomes the instance id; Windows makes one up (with '&') when there is none
            serial=None if "&" in parent.instance else _text(parent.instance),
            vendor=parent.manufacturer or next((f.manufacturer for f in funcs if f.manufacturer), None),
            # a composite parent is only "USB Composite Device"; its first function has the real name
            product=next((f.name for f in funcs if f.name), None) or parent.name,
            drivers=tuple(sorted({r.service for r in members if r.service})),
            problem=problems[0] if problems else parent.problem,
            status=statuses[0] if statuses else parent.status,
        ))
    return devices


def run_powershell(script: str, timeout: float = POWERSHELL_TIMEOUT) -> str:
    """Runs a PowerShell script and returns what it printed; UsbListError if it cannot."""
    import shutil  # Windows only
    import subprocess

    exe = shutil.which("powershell.exe") or shutil.which("powershell") or shutil.which("pwsh")
    if exe is None:
        raise UsbListError("PowerShell not found")
    try:
        done = subprocess.run(
            [exe, "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-Command", script],
            capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console flashing on the desk
        )
    except subprocess.TimeoutExpired:
        raise UsbListError(f"PowerShell did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise UsbListError(f"cannot start PowerShell: {exc.strerror or exc}") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UsbListError(f"PowerShell exited with {done.returncode}: {lines[0] if lines else 'no message'}")
    return done.stdout.decode("utf-8-sig", "replace")


# ---------------------------------------------------------------------------------------------
# From a device list to a report entry


def resolve_platform(choice: str, running_on: str) -> str:
    if choice != "auto":
        return choice
    if running_on.startswith("win"):
        return "windows"
    if running_on.startswith("linux"):
        return "linux"
    raise UsbListError(f"no USB listing for platform {running_on!r}; set platform: linux or windows")


def list_usb_devices(platform: str, sysfs_root: str = "/sys",
                     powershell: Callable[[str, float], str] = run_powershell) -> list[UsbDevice]:
    """Every USB device present, also for `ektp-agent check` to name unknown ones.

    `platform` is "linux" or "windows" (see resolve_platform). Raises UsbListError when the
    devices cannot be listed at all.
    """
    if platform == "windows":
        return parse_pnp_json(powershell(PNP_SCRIPT, POWERSHELL_TIMEOUT))
    return parse_sysfs(read_sysfs_usb(sysfs_root))


class ListingCache:
    """One device listing shared by the kit's USB probes.

    Windows: each listing starts PowerShell, which takes a second or more on an old PC, and five
    probes would otherwise start five; a listing serves for `max_age` seconds after it was made.
    Linux: reading sysfs is cheap, but five probes that run at the same moment would read the same
    fifty-odd files five times; a listing serves only the probes that ask at most `fresh` seconds
    (SYSFS_SHARE) after it began, so what a run sees is never older than that.
    """

    def __init__(self, max_age: float = 5.0):
        self.max_age = max_age
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._started = 0.0  # monotonic time the cached listing began
        self._done = 0.0  # and when it was complete
        self._result: list[UsbDevice] | UsbListError | None = None

    def get(self, key: tuple, fetch: Callable[[], list[UsbDevice]], fresh: float | None = None) -> list[UsbDevice]:
        asked = time.monotonic()
        with self._lock:  # the other probes wait for the one listing, then share it
            stale = asked - self._started > fresh if fresh is not None else asked - self._done >= self.max_age
            if self._key != key or stale:
                self._started = time.monotonic()
                try:
                    self._result = fetch()
                except UsbListError as exc:
                    self._result = exc
                self._key, self._done = key, time.monotonic()
            if isinstance(self._result, UsbListError):
                raise self._result
            return self._result


def _same_serial(a: str | None, b: str | None) -> bool:
    # Windows upper-cases serial numbers in instance ids
    return a is not None and b is not None and a.strip().casefold() == b.strip().casefold()


def fault(device: UsbDevice, require_driver: bool) -> tuple[str, str] | None:
    """(code, detail) when a present unit cannot be used, else None."""
    if device.problem:
        return "device_problem", str(device.problem)
    if device.problem is None and device.status and device.status.upper() == "ERROR":
        return "device_problem", f"status {device.status}"
    if require_driver and device.interfaces is not None and not device.drivers:
        # the interfaces without a driver; none at all means no USB configuration is active
        return "driver_not_bound", ", ".join(device.unbound)
    return None


def evaluate(devices: Iterable[UsbDevice], ids: Iterable[str], serial: str | None = None,
             require_driver: bool = True) -> wire.DeviceEntry:
    """The entry for one device kind: the best matching unit, and how many there are."""
    wanted = {i.lower() for i in ids}
    units = [d for d in devices if d.usb_id in wanted]
    if not units:
        return wire.DeviceEntry(s="missing", c="not_detected", count=0)

    def preference(unit: UsbDevice) -> tuple:
        # this kit's own unit first, then a working one, then a stable order
        return (not _same_serial(unit.serial, serial), fault(unit, require_driver) is not None, unit.bus or "",
                unit.serial or "")

    unit = min(units, key=preference)
    entry = wire.DeviceEntry(
        s="ok", vid=unit.vid, pid=unit.pid, vendor=unit.vendor, product=unit.product, serial=unit.serial,
        bus=unit.bus, driver=",".join(unit.drivers)[:64] or None, problem=unit.problem, count=len(units),
    )
    problem = fault(unit, require_driver)
    if problem is not None:
        code, detail = problem
        return structs.replace(entry, s="error", c=code, m=detail[:256])
    if serial is not None and not _same_serial(unit.serial, serial):
        detail = f"{unit.serial or '-'} / {serial}"  # found / expected; words come from messages.py
        return structs.replace(entry, s="warn", c="other_unit", m=detail[:256])
    return entry


class UsbProbe(Probe):
    type_name = "usb"
    entry_type = wire.DeviceEntry
    Options = UsbOptions
    codes = ("not_detected", "other_unit", "driver_not_bound", "device_problem", "usb_unreadable")

    def __init__(self, name: str, options: UsbOptions, context):
        super().__init__(name, options, context)
        self.ids = tuple(sorted({i.lower() for i in options.ids}))
        # how a Windows listing is obtained; tests hand in recorded output instead
        self.powershell: Callable[[str, float], str] = run_powershell

    def platform(self) -> str:
        return resolve_platform(self.options.platform, self.context.platform)

    def list_devices(self) -> list[UsbDevice]:
        platform = self.platform()
        fetch = lambda: list_usb_devices(platform, self.context.sysfs_root, self.powershell)  # noqa: E731
        cache = getattr(self.context, "usb_listing", None)
        if cache is None:
            return fetch()
        if platform == "windows":
            return cache.get((platform, self.powershell), fetch)
        return cache.get((platform, self.context.sysfs_root), fetch, fresh=SYSFS_SHARE)

    def presence(self) -> wire.DeviceEntry:
        try:
            devices = self.list_devices()
        except UsbListError as exc:
            return self.failed("usb_unreadable", str(exc))
        return evaluate(devices, self.ids, self.options.serial, self.options.require_driver)

    def run(self) -> wire.DeviceEntry:
        return self.presence()

    def change_key(self, entry: wire.DeviceEntry) -> tuple:
        # the serial is in the key so a swapped or lent unit is reported at once
        serial = entry.serial.casefold() if entry.serial else None
        return (entry.s, entry.c, serial, entry.count, entry.usable, entry.problem)
