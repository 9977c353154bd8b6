"""USB device probes (fingerprint, iris, signature pad, camera, card reader) on fixture sysfs trees,
Windows PnP JSON, a real V4L2 ioctl, and the device catalogue with usb.ids names."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import time
from pathlib import Path

import msgspec
import pytest
import yaml

from agent import wire
from agent.catalogue import (
    DEFAULT_CATALOGUE,
    CatalogueError,
    UsbNamer,
    describe_usb,
    load_catalogue,
    parse_catalogue,
    parse_usb_ids,
)
from agent.config import ConfigError, load
from agent.probes.base import ProbeContext
from agent.probes.camera import (
    V4L2_CAPABILITY,
    VIDIOC_QUERYCAP,
    CameraProbe,
    parse_capability,
    query_capability,
)
from agent.probes.card_reader import CardReaderProbe, PcscAnswer, combine, pcsc_readers
from agent.probes.usb import (
    PNP_SCRIPT,
    SysfsDevice,
    UsbDevice,
    UsbListError,
    UsbProbe,
    evaluate,
    list_usb_devices,
    parse_pnp_json,
    parse_sysfs,
    read_sysfs_usb,
    run_powershell,
)
from agent.probes import REGISTRY
from agent.runner import InlineExecutor, Runner, Slot
from conftest import wait_for, write_agent_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SYSFS = FIXTURES / "sysfs"
WINDOWS = FIXTURES / "windows"
DEVICE_DIR = "devices/pci0000:00/0000:00:14.0/usb1"

# The fixture kit (tests/fixtures/sysfs/build.py): ids from config/devices.yaml, the iris unit a stand-in.
KIT = {
    "fingerprint": (UsbProbe, ["05ba:000a"]),
    "iris": (UsbProbe, ["1d6b:0104"]),
    "camera": (CameraProbe, ["046d:082d"]),
    "signature_pad": (UsbProbe, ["056a:00a2"]),
    "card_reader": (CardReaderProbe, ["072f:90cc"]),
}


def context(sysfs: Path | str = SYSFS / "all-present", dev: Path | str = "/dev", platform: str = "linux"):
    return ProbeContext(sysfs_root=str(sysfs), dev_root=str(dev), platform=platform)


def make(name: str, ctx: ProbeContext, **options):
    cls, ids = KIT[name]
    opts = msgspec.convert({"ids": ids, **options}, cls.Options, strict=True)
    probe = cls(name, opts, ctx)
    if isinstance(probe, CardReaderProbe):
        probe.ask_pcsc = lambda: PcscAnswer(None, "not asked in this test")
    return probe


def run_kit(ctx: ProbeContext, **options) -> dict[str, wire.DeviceEntry]:
    return {name: make(name, ctx, **options).run() for name in KIT}


def copy_tree(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(SYSFS / name, target, symlinks=True)
    return target


def unplug(root: Path, bus: str) -> None:
    """What the kernel does when a device goes: its directory and its bus/usb/devices links vanish."""
    devices = root / "bus/usb/devices"
    real = (devices / bus).resolve()
    for link in list(devices.iterdir()):
        if link.name == bus or link.name.startswith(bus + ":"):
            link.unlink()
    shutil.rmtree(real)


# ---------------------------------------------------------------------------------------------
# Linux: reader and parser


def test_reader_reads_attributes_and_driver_links():
    raw = {d.name: d for d in read_sysfs_usb(str(SYSFS / "all-present"))}
    assert set(raw) == {"usb1", "1-1", "1-1.1", "1-1.2", "1-1.3", "1-1.4", "1-2"}
    fingerprint = raw["1-1.1"]
    assert fingerprint.attrs == {"idVendor": "05ba", "idProduct": "000a", "serial": "TEST-FP-0001",
                                 "manufacturer": "DigitalPersona, Inc.", "product": "Fingerprint Reader"}
    assert fingerprint.interfaces == {"1-1.1:1.0": "usbfs"}
    assert raw["1-1.3"].interfaces == {"1-1.3:1.0": "uvcvideo", "1-1.3:1.1": "uvcvideo",
                                       "1-1.3:1.2": "snd-usb-audio", "1-1.3:1.3": "snd-usb-audio"}
    assert raw["usb1"].interfaces == {"1-0:1.0": "hub"}  # a root hub's interface is named 1-0:1.0
    assert "serial" not in raw["1-1.4"].attrs


def test_reader_without_usb_bus_says_so(tmp_path):
    with pytest.raises(UsbListError, match="cannot list .*bus/usb/devices: No such file"):
        read_sysfs_usb(str(tmp_path))


def test_parser_normalises_and_skips_half_gone_devices():
    raw = [
        SysfsDevice("1-3", {"idVendor": "05BA", "idProduct": "000A\n", "serial": "  ", "product": " Reader "},
                    {"1-3:1.0": None, "1-3:1.1": "usbhid"}),
        SysfsDevice("1-4", {"idProduct": "0001"}, {}),  # idVendor unreadable: cannot be matched
        SysfsDevice("1-5", {"idVendor": "zzzz", "idProduct": "0001"}, {}),
    ]
    [device] = parse_sysfs(raw)
    assert device == UsbDevice(vid="05ba", pid="000a", serial=None, product="Reader", bus="1-3",
                               drivers=("usbhid",), unbound=("1-3:1.0",), interfaces=2)


def test_all_present():
    entries = run_kit(context(SYSFS / "all-present"))
    assert {name: (e.s, e.c) for name, e in entries.items()} == {name: ("ok", "") for name in KIT}
    fp = entries["fingerprint"]
    assert (fp.vid, fp.pid, fp.vendor, fp.product, fp.serial, fp.bus, fp.driver, fp.count) == (
        "05ba", "000a", "DigitalPersona, Inc.", "Fingerprint Reader", "TEST-FP-0001", "1-1.1", "usbfs", 1)
    assert entries["camera"].driver == "snd-usb-audio,uvcvideo"
    assert entries["camera"].usable is None  # no v4l2 node configured: presence only
    assert entries["signature_pad"].serial is None and entries["signature_pad"].driver == "usbhid"
    assert entries["card_reader"].bus == "1-2"


def test_fingerprint_missing():
    entries = run_kit(context(SYSFS / "fingerprint-missing"))
    fp = entries["fingerprint"]
    assert (fp.s, fp.c, fp.count, fp.vid, fp.serial) == ("missing", "not_detected", 0, None, None)
    assert all(e.s == "ok" for name, e in entries.items() if name != "fingerprint")


def test_iris_without_driver_is_an_error_unless_not_required():
    iris = make("iris", context(SYSFS / "iris-no-driver")).run()
    assert (iris.s, iris.c, iris.m) == ("error", "driver_not_bound", "1-1.2:1.0")
    assert (iris.serial, iris.bus, iris.driver, iris.count) == ("TEST-IRIS-0001", "1-1.2", None, 1)
    relaxed = make("iris", context(SYSFS / "iris-no-driver"), require_driver=False).run()
    assert (relaxed.s, relaxed.c) == ("ok", "")


def test_unplugging_turns_ok_into_missing_with_a_new_change_key(tmp_path):
    root = copy_tree("all-present", tmp_path)
    probe = make("fingerprint", context(root))
    before = probe.run()
    assert before.s == "ok"
    unplug(root, "1-1.1")
    after = probe.run()
    assert (after.s, after.c) == ("missing", "not_detected")
    assert probe.change_key(before) != probe.change_key(after)
    assert make("camera", context(root)).run().s == "ok"  # its neighbours are untouched


def test_unplug_goes_out_at_once_through_the_runner(tmp_path):
    root = copy_tree("all-present", tmp_path)
    reports: list[wire.Report] = []

    class Clock:
        mono = 1000.0

        def time(self):
            return 1_800_000_000.0 + self.mono

        def monotonic(self):
            return self.mono

    clock = Clock()
    probe = make("fingerprint", context(root))
    runner = Runner(wire.KitId("sintang", "dedai", "kit-1"), [Slot(probe, 10.0, 5.0)], heartbeat=3600,
                    emit=reports.append, clock=clock, executor=InlineExecutor(), boot="0123456789abcdef")
    runner.step()
    clock.mono += 10
    runner.step()
    assert len(reports) == 1  # unchanged: nothing until the heartbeat
    unplug(root, "1-1.1")
    clock.mono += 10
    runner.step()
    assert len(reports) == 2 and reports[-1].p["fingerprint"].s == "missing"
    decoded = wire.decode_report(wire.encode(reports[-1], compress=True))
    assert decoded.p["fingerprint"].c == "not_detected"


@pytest.mark.skipif("usb" not in REGISTRY, reason="runs once agent/probes/__init__.py registers the usb probe")
def test_unplug_reaches_the_broker_at_once(tmp_path, broker, recorder_factory, agent_process):
    """The agent process on a fixture tree, through a real Mosquitto: unplugging is reported at once."""
    root = copy_tree("all-present", tmp_path)
    probes = {"fingerprint": {"interval": 0.2, "timeout": 0.2, "ids": ["05ba:000a"], "serial": "TEST-FP-0001"},
              "camera": {"interval": 0.2, "timeout": 0.2, "ids": ["046d:082d"]}}
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state", heartbeat=60, probes=probes,
                             paths={"sysfs": str(root)})
    rec = recorder_factory(broker)
    agent_process(cfg)
    first = wait_for(lambda: rec.reports(), what="a first report")[0]
    assert (first.p["fingerprint"].s, first.p["fingerprint"].serial) == ("ok", "TEST-FP-0001")
    unplug(root, "1-1.1")
    cut = time.monotonic()
    message = wait_for(lambda: [m for m in rec.of("report") if m.decode().p["fingerprint"].s == "missing"],
                       timeout=5, what="the fingerprint-missing report")[0]
    assert message.received - cut <= 2.0
    assert message.decode().p["camera"].s == "ok"


def test_swapped_unit(tmp_path):
    root = copy_tree("all-present", tmp_path)
    serial_file = root / DEVICE_DIR / "1-1/1-1.1/serial"
    own = make("fingerprint", context(root), serial="test-fp-0001")  # compared without case
    plain = make("fingerprint", context(root))
    first, first_plain = own.run(), plain.run()
    assert (first.s, first.serial) == ("ok", "TEST-FP-0001")
    serial_file.write_text("TEST-FP-0099\n")  # a unit lent from another kecamatan
    second, second_plain = own.run(), plain.run()
    assert (second.s, second.c, second.serial) == ("warn", "other_unit", "TEST-FP-0099")
    assert second.m == "TEST-FP-0099 / test-fp-0001"
    assert own.change_key(first) != own.change_key(second)
    # without an expected serial the state stays ok, but the swap still changes the key
    assert second_plain.s == "ok" and plain.change_key(first_plain) != plain.change_key(second_plain)


def test_unreadable_attribute_is_tolerated(tmp_path):
    root = copy_tree("all-present", tmp_path)
    serial = root / DEVICE_DIR / "1-1/1-1.1/serial"
    serial.unlink()
    serial.mkdir()  # reading it fails with EISDIR, like an attribute the agent may not read
    entry = make("fingerprint", context(root)).run()
    assert (entry.s, entry.serial, entry.vid) == ("ok", None, "05ba")


def test_no_usb_bus_is_an_error_not_missing(tmp_path):
    entry = make("fingerprint", context(tmp_path)).run()
    assert (entry.s, entry.c) == ("error", "usb_unreadable")
    assert "bus/usb/devices" in entry.m


def test_unsupported_platform_says_what_to_set():
    entry = make("fingerprint", context(platform="darwin")).run()
    assert (entry.s, entry.c) == ("error", "usb_unreadable")
    assert "set platform: linux or windows" in entry.m


def test_several_units_prefer_own_then_working():
    own = UsbDevice(vid="05ba", pid="000a", serial="A", bus="1-2", interfaces=1, drivers=("usbfs",))
    other = UsbDevice(vid="05ba", pid="000a", serial="B", bus="1-1", interfaces=1, drivers=("usbfs",))
    broken = UsbDevice(vid="05ba", pid="000a", serial="C", bus="1-0", interfaces=1, unbound=("1-0:1.0",))
    assert evaluate([broken, other, own], ["05ba:000a"], serial="A").serial == "A"
    entry = evaluate([broken, other], ["05ba:000a"])
    assert (entry.s, entry.serial, entry.count) == ("ok", "B", 2)
    entry = evaluate([broken], ["05ba:000a"])
    assert (entry.s, entry.c) == ("error", "driver_not_bound")
    unconfigured = UsbDevice(vid="05ba", pid="000a", interfaces=0)
    assert evaluate([unconfigured], ["05ba:000a"]).c == "driver_not_bound"


# ---------------------------------------------------------------------------------------------
# Windows


def windows_probe(name: str, fixture: str, **options):
    probe = make(name, context(platform="win32"), **options)
    calls = []

    def powershell(script: str, timeout: float) -> str:
        calls.append((script, timeout))
        return (WINDOWS / fixture).read_text(encoding="utf-8")

    probe.powershell = powershell
    return probe, calls


def test_windows_all_present():
    entries = {}
    for name in KIT:
        probe, calls = windows_probe(name, "all-present.json")
        entries[name] = probe.run()
        assert calls == [(PNP_SCRIPT, 8.0)]
    assert {name: e.s for name, e in entries.items()} == {name: "ok" for name in KIT}
    fp = entries["fingerprint"]
    assert (fp.vid, fp.pid, fp.serial, fp.vendor, fp.driver, fp.problem) == (
        "05ba", "000a", "TEST-FP-0001", "DigitalPersona, Inc.", "WUDFRd", 0)
    camera = entries["camera"]  # a composite device: the parent plus its functions
    assert (camera.serial, camera.product, camera.driver) == (
        "TEST-CAM-0001", "HD Pro Webcam C920", "usbaudio,usbccgp,usbvideo")
    assert entries["card_reader"].serial is None  # Windows made an instance id up: no serial number
    assert entries["camera"].bus is None


def test_windows_parser_drops_hubs_and_remembered_devices():
    devices = parse_pnp_json((WINDOWS / "all-present.json").read_text())
    ids = sorted(d.usb_id for d in devices)
    assert ids == ["046d:082d", "056a:00a2", "05ba:000a", "05e3:0608", "072f:90cc", "1d6b:0104"]


def test_windows_problem_code():
    probe, _ = windows_probe("fingerprint", "fingerprint-problem-28.json")
    entry = probe.run()
    assert (entry.s, entry.c, entry.problem, entry.m, entry.driver) == ("error", "device_problem", 28, "28", None)
    assert entry.serial == "TEST-FP-0001"


def test_windows_disconnected():
    probe, _ = windows_probe("fingerprint", "fingerprint-disconnected.json")
    assert (probe.run().s, probe.run().c) == ("missing", "not_detected")
    camera, _ = windows_probe("camera", "fingerprint-disconnected.json")
    assert camera.run().s == "ok"


def test_windows_single_object_with_get_pnpdevice_names():
    probe, _ = windows_probe("fingerprint", "single-object.json")
    entry = probe.run()
    assert (entry.s, entry.serial, entry.product, entry.count) == ("ok", "TEST-FP-0001", "Fingerprint Reader", 1)


def test_windows_other_shapes():
    assert parse_pnp_json("") == []  # ConvertTo-Json prints nothing when nothing matches
    assert parse_pnp_json("\ufeff[]") == []  # a byte-order mark from the UTF-8 console
    with pytest.raises(UsbListError, match="not print JSON"):
        parse_pnp_json("Get-CimInstance : Access denied")
    with pytest.raises(UsbListError, match="expected a list"):
        parse_pnp_json('"text"')
    # a function whose parent was not listed still counts as the unit; an error status without a code
    [device] = parse_pnp_json('{"PNPDeviceID": "USB\\\\VID_046D&PID_082D&MI_00\\\\6&2F&0&0000",'
                              ' "Name": "Cam", "Status": "Error", "ConfigManagerErrorCode": null}')
    assert (device.usb_id, device.serial, device.product) == ("046d:082d", None, "Cam")
    entry = evaluate([device], ["046d:082d"])
    assert (entry.s, entry.c, entry.m) == ("error", "device_problem", "status Error")


def test_windows_listing_failure_is_an_error():
    probe = make("fingerprint", context(platform="win32"))

    def broken(script, timeout):
        raise UsbListError("PowerShell did not answer within 8 s")

    probe.powershell = broken
    entry = probe.run()
    assert (entry.s, entry.c, entry.m) == ("error", "usb_unreadable", "PowerShell did not answer within 8 s")


CAT, SLEEP = shutil.which("cat"), shutil.which("sleep")  # found before the tests narrow PATH


def fake_powershell(tmp_path: Path, body: str) -> str:
    """A `powershell` on PATH that is a shell script, to drive run_powershell for real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "powershell"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(bin_dir)


def test_run_powershell_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(UsbListError, match="PowerShell not found"):
        run_powershell("x")
    monkeypatch.setenv("PATH", fake_powershell(tmp_path, f'{CAT} "{WINDOWS / "single-object.json"}"'))
    assert parse_pnp_json(run_powershell(PNP_SCRIPT))[0].serial == "TEST-FP-0001"


def test_run_powershell_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_powershell(tmp_path, 'echo "Get-CimInstance : Invalid class" >&2; exit 1'))
    with pytest.raises(UsbListError, match="exited with 1: Get-CimInstance : Invalid class"):
        run_powershell("x")
    shutil.rmtree(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake_powershell(tmp_path, f"exec {SLEEP} 5"))
    with pytest.raises(UsbListError, match="did not answer within 0.3 s"):
        run_powershell("x", timeout=0.3)


# ---------------------------------------------------------------------------------------------
# Camera: V4L2


def test_querycap_constants():
    assert V4L2_CAPABILITY.size == 104 and VIDIOC_QUERYCAP == 0x80685600


def test_v4l2_on_a_regular_file_fails_for_real(tmp_path):
    node = tmp_path / "video0"
    node.write_bytes(b"")
    with pytest.raises(OSError) as caught:
        query_capability(str(node))
    assert caught.value.errno == errno.ENOTTY
    entry = make("camera", context(dev=tmp_path), v4l2="video0").run()  # relative: under paths.dev
    assert (entry.s, entry.c, entry.usable) == ("error", "not_usable", False)
    assert entry.m == f"{node}: {os.strerror(errno.ENOTTY)}"
    assert entry.serial == "TEST-CAM-0001"  # the USB facts stay


def test_v4l2_on_dev_null_and_on_a_missing_node(tmp_path):
    entry = make("camera", context(), v4l2="/dev/null").run()
    assert (entry.s, entry.c, entry.m) == ("error", "not_usable", f"/dev/null: {os.strerror(errno.ENOTTY)}")
    entry = make("camera", context(dev=tmp_path), v4l2="video7").run()
    assert (entry.s, entry.c) == ("error", "not_usable")
    assert entry.m == f"{tmp_path / 'video7'}: {os.strerror(errno.ENOENT)}"


def capability(device_caps: int, card: bytes = b"HD Pro Webcam C920") -> bytes:
    return V4L2_CAPABILITY.pack(b"uvcvideo", card, b"usb-0000:00:14.0-1.3", 0x060100, 0x84a00001 | device_caps,
                                device_caps)


def test_v4l2_success_and_metadata_node_with_an_injected_ioctl(tmp_path):
    """No V4L2 device exists here (no kernel modules to load vivid or v4l2loopback), so the answer
    of a capture node is injected; opening the node and parsing the answer are the real code."""
    node = tmp_path / "video0"
    node.write_bytes(b"")
    seen = []

    def ioctl_answering(caps: bytes):
        def ioctl(fd, request, buf, mutate):
            seen.append((request, len(buf), mutate))
            buf[:] = caps
            return 0
        return ioctl

    probe = make("camera", context(dev=tmp_path), v4l2=str(node))
    probe.ioctl = ioctl_answering(capability(0x04200001))  # VIDEO_CAPTURE | STREAMING | EXT_PIX_FORMAT
    entry = probe.run()
    assert (entry.s, entry.c, entry.usable) == ("ok", "", True)
    assert seen == [(VIDIOC_QUERYCAP, 104, True)]
    probe.ioctl = ioctl_answering(capability(0x04a00000))  # META_CAPTURE: a UVC camera's second node
    entry = probe.run()
    assert (entry.s, entry.c, entry.usable) == ("error", "not_usable", False)
    assert entry.m == f"{node}: HD Pro Webcam C920 is not a video capture node"
    assert probe.change_key(entry) != probe.change_key(make("camera", context()).run())


def test_v4l2_capability_parsing():
    cap = parse_capability(capability(0x00000001))
    assert (cap.driver, cap.card, cap.bus_info, cap.can_capture) == (
        "uvcvideo", "HD Pro Webcam C920", "usb-0000:00:14.0-1.3", True)
    # an old driver without DEVICE_CAPS: the device-wide capabilities decide
    old = parse_capability(V4L2_CAPABILITY.pack(b"gspca", b"cam", b"usb-1", 0, 0x00000001, 0))
    assert old.can_capture


def test_v4l2_not_tried_when_the_camera_is_missing_or_on_windows(tmp_path):
    probe = make("camera", context(SYSFS / "fingerprint-missing"), v4l2="/dev/null")
    probe.ioctl = lambda *a: pytest.fail("no ioctl for a camera that is not plugged in")
    root = copy_tree("all-present", tmp_path)
    unplug(root, "1-1.3")
    probe.context = context(root)
    assert probe.run().s == "missing"
    windows, _ = windows_probe("camera", "all-present.json", v4l2="/dev/null")
    assert (windows.run().s, windows.run().usable) == ("ok", None)


# ---------------------------------------------------------------------------------------------
# Card reader: PC/SC or USB


def test_card_reader_falls_back_to_usb_without_pyscard(monkeypatch):
    monkeypatch.setitem(sys.modules, "smartcard", None)  # `import smartcard` now fails as when absent
    monkeypatch.setitem(sys.modules, "smartcard.System", None)
    answer = pcsc_readers()
    assert answer == PcscAnswer(None, "pyscard is not installed")
    probe = CardReaderProbe("card_reader", msgspec.convert({"ids": ["072f:90cc"]}, CardReaderProbe.Options),
                            context())
    entry = probe.run()  # the real pcsc_readers
    assert (entry.s, entry.c, entry.usable, entry.product) == ("ok", "", None, "ACR38 SmartCard Reader")


def test_card_reader_through_pcsc():
    probe = make("card_reader", context(), reader_name="acr38")
    probe.ask_pcsc = lambda: PcscAnswer(["Gemalto PC Twin Reader 00 00", "ACS ACR38U 01 00"])
    entry = probe.run()
    assert (entry.s, entry.usable, entry.product, entry.vid, entry.count) == (
        "ok", True, "ACS ACR38U 01 00", "072f", 1)
    probe.ask_pcsc = lambda: PcscAnswer(["Gemalto PC Twin Reader 00 00"])
    entry = probe.run()
    assert (entry.s, entry.c, entry.usable) == ("error", "pcsc_no_reader", False)
    assert entry.m == "Gemalto PC Twin Reader 00 00"
    probe.ask_pcsc = lambda: PcscAnswer([])
    assert probe.run().m == "-"


def test_card_reader_pcsc_against_usb_states():
    missing = wire.DeviceEntry(s="missing", c="not_detected", count=0)
    # listed by PC/SC although the configured USB ids did not match: it works
    assert combine(missing, PcscAnswer(["ACS ACR39U ICC Reader 00 00"]), None).s == "ok"
    assert combine(missing, PcscAnswer(["X"]), "acr38") == missing
    problem = wire.DeviceEntry(s="error", c="device_problem", m="28", problem=28)
    assert combine(problem, PcscAnswer([]), None).c == "device_problem"  # the precise reason stays
    swapped = wire.DeviceEntry(s="warn", c="other_unit", m="B / A", serial="B")
    assert (combine(swapped, PcscAnswer(["R"]), None).s, combine(swapped, PcscAnswer(["R"]), None).usable) == (
        "warn", True)
    assert combine(swapped, PcscAnswer(None, "no daemon"), None) == swapped
    probe = make("card_reader", context(), pcsc=False)
    probe.ask_pcsc = lambda: pytest.fail("PC/SC switched off")
    assert probe.run().s == "ok"


# ---------------------------------------------------------------------------------------------
# Options and config


def test_options_validation():
    convert = lambda data: msgspec.convert(data, UsbProbe.Options, strict=True)  # noqa: E731
    with pytest.raises(msgspec.ValidationError):
        convert({"ids": []})
    with pytest.raises(msgspec.ValidationError):
        convert({"ids": ["05ba-000a"]})
    with pytest.raises(msgspec.ValidationError, match="unknown field `v4l2`"):
        convert({"ids": ["05ba:000a"], "v4l2": "/dev/video0"})  # a camera option only
    # upper case as Device Manager shows it is accepted and used in lower case
    probe = UsbProbe("fingerprint", convert({"ids": ["05BA:000A"]}), context())
    assert probe.ids == ("05ba:000a",) and probe.run().s == "ok"


def test_config_file_with_device_probes(tmp_path):
    registry = {cls.type_name: cls for cls in (UsbProbe, CameraProbe, CardReaderProbe)}
    config = {
        "kit": {"kabupaten": "sintang", "kecamatan": "dedai", "id": "kit-1"},
        "broker": {"url": "mqtt://127.0.0.1:1883"},
        "state_dir": str(tmp_path / "state"),
        "paths": {"sysfs": str(SYSFS / "all-present")},
        "probes": {
            "fingerprint": {"type": "usb", "ids": ["05ba:000a"], "serial": "TEST-FP-0001"},
            "camera": {"type": "camera", "ids": ["046d:082d"], "v4l2": "video0"},
            "card_reader": {"type": "card_reader", "ids": ["072f:90cc"], "reader_name": "ACR38"},
        },
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    loaded = load(path, registry=registry)
    assert [spec.options.ids for spec in loaded.probes] == [["05ba:000a"], ["046d:082d"], ["072f:90cc"]]
    config["probes"]["fingerprint"]["ids"] = ["05ba:00"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        load(path, registry=registry)
    assert caught.value.key == "probes.fingerprint.ids[0]"


def test_entries_fit_the_wire():
    entries = run_kit(context(SYSFS / "all-present"))
    report = wire.Report(v=1, kab="sintang", kec="dedai", kit="kit-1", ts=1.0, boot="0123456789abcdef",
                         seq=1, hb=60, p=entries)
    assert wire.decode_report(wire.encode(report, compress=True)).p == entries


# ---------------------------------------------------------------------------------------------
# Catalogue and usb.ids


def test_catalogue_entries_have_ids_and_sources():
    catalogue = load_catalogue()
    assert catalogue.note == "candidates; verify with lsusb / Device Manager"
    assert set(catalogue.kinds) == {"fingerprint", "iris", "camera", "signature_pad", "card_reader"}
    entries = [entry for body in catalogue.kinds.values() for entry in body.candidates]
    assert len(entries) > 40
    for entry in entries:
        assert entry.source.startswith("usb.ids (Debian hwdata/usbutils, version 2025.07.26)"), entry
        vid, pid = entry.id.split(":")
        assert len(vid) == len(pid) == 4 and entry.id == entry.id.lower()
    assert len({entry.id for entry in entries}) == len(entries)
    assert catalogue.kinds["iris"].candidates == [] and "lsusb" in catalogue.kinds["iris"].note
    # the fixture kit's ids come from the catalogue (except the iris stand-in)
    for name, (_, ids) in KIT.items():
        if name != "iris":
            assert set(ids) <= set(catalogue.ids(name)), name


def test_catalogue_matches_the_installed_usb_ids():
    """Where usb.ids is installed (`apt-get install usb.ids`), every catalogue id is in it."""
    namer = UsbNamer()
    catalogue = load_catalogue(DEFAULT_CATALOGUE)
    if namer.database() is None:
        assert namer.name("046d", "082d") is None
        return
    for body in catalogue.kinds.values():
        for entry in body.candidates:
            vid, pid = entry.id.split(":")
            assert namer.database().products.get(entry.id) == entry.product, entry
            assert namer.database().vendors.get(vid) == entry.vendor, entry


def test_catalogue_refuses_an_entry_without_source():
    data = {"note": "candidates", "kinds": {"camera": {"candidates": [
        {"id": "046d:082d", "vendor": "Logitech, Inc.", "product": "HD Pro Webcam C920"}]}}}
    with pytest.raises(CatalogueError, match="missing required field `source`"):
        parse_catalogue(data)
    data["kinds"]["camera"]["candidates"][0].update(source="usb.ids", id="046D:082D")
    with pytest.raises(CatalogueError, match="candidates\\[0\\].id"):
        parse_catalogue(data)
    with pytest.raises(CatalogueError, match="cannot read"):
        load_catalogue(FIXTURES / "no-such-catalogue.yaml")


def test_usb_ids_parsing():
    ids = parse_usb_ids((FIXTURES / "usb.ids").read_text().splitlines())
    assert ids.version == "2025.07.26"
    assert ids.vendors == {"046d": "Logitech, Inc.", "05ba": "DigitalPersona, Inc.", "05e3": "Genesys Logic, Inc.",
                           "1162": "Secugen Corp."}
    assert ids.products == {"046d:0825": "Webcam C270", "046d:082d": "HD Pro Webcam C920",
                            "05ba:000a": "Fingerprint Reader", "05e3:0608": "Hub"}


def test_naming_unknown_devices(tmp_path):
    namer = UsbNamer([tmp_path / "absent.ids", FIXTURES / "usb.ids"])
    assert namer.name("046D", "082D") == "Logitech, Inc. HD Pro Webcam C920"
    assert namer.name("1162", "2200") == "Secugen Corp."  # vendor known, product not
    assert namer.name("ffff", "0001") is None
    assert namer.path == str(FIXTURES / "usb.ids")
    missing = UsbNamer([tmp_path / "absent.ids"])
    assert missing.name("046d", "082d") is None and missing.database() is None


def test_usb_ids_is_parsed_once(tmp_path):
    copy = tmp_path / "usb.ids"
    shutil.copy(FIXTURES / "usb.ids", copy)
    namer = UsbNamer([copy])
    assert namer.name("05ba", "000a") == "DigitalPersona, Inc. Fingerprint Reader"
    copy.unlink()
    assert namer.name("046d", "0825") == "Logitech, Inc. Webcam C270"


def test_naming_what_is_plugged_in():
    """What `ektp-agent check` will do: list every USB device and name the ones nobody configured."""
    catalogue = load_catalogue()
    namer = UsbNamer([FIXTURES / "usb.ids"])
    configured = {i for _, ids in KIT.values() for i in ids}
    devices = list_usb_devices("linux", str(SYSFS / "all-present"))
    others = {d.usb_id: describe_usb(d.vid, d.pid, catalogue, namer) for d in devices if d.usb_id not in configured}
    assert others == {"1d6b:0002": None, "05e3:0608": "Genesys Logic, Inc. Hub"}


def test_describe_prefers_the_catalogue():
    catalogue = load_catalogue()
    namer = UsbNamer([FIXTURES / "usb.ids"])
    assert describe_usb("05ba", "000a", catalogue, namer) == (
        "DigitalPersona, Inc. Fingerprint Reader (fingerprint candidate)")
    assert describe_usb("046d", "0825", None, namer) == "Logitech, Inc. Webcam C270"
    assert describe_usb("1d6b", "0104", catalogue, UsbNamer([])) is None


def test_windows_listing_is_shared_by_the_kit_probes():
    """Five USB probes at once start PowerShell once, not five times."""
    import threading

    from agent.probes.usb import ListingCache

    calls = []
    text = (WINDOWS / sorted(p.name for p in WINDOWS.glob("*.json"))[0]).read_text(encoding="utf-8-sig")

    def powershell(script, timeout):
        calls.append(1)
        return text

    ctx = ProbeContext(platform="win32", usb_listing=ListingCache())
    probes = [make(name, ctx) for name in KIT]
    for probe in probes:
        probe.powershell = powershell
    threads = [threading.Thread(target=probe.run) for probe in probes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1


def counting_reader(monkeypatch, delay: float = 0.0) -> list[str]:
    """Counts sysfs listings: read_sysfs_usb is what every Linux USB probe run calls."""
    import agent.probes.usb as usb

    calls: list[str] = []
    real = usb.read_sysfs_usb

    def reader(root):
        calls.append(root)
        time.sleep(delay)
        return real(root)

    monkeypatch.setattr(usb, "read_sysfs_usb", reader)
    return calls


@pytest.mark.parametrize("delay", [0.0, 0.4], ids=["fast", "slower-than-sysfs-share"])
def test_linux_listing_is_shared_by_the_probes_that_run_together(tmp_path, monkeypatch, delay):
    """Five USB probes due at the same moment read sysfs once, not five times, also when the
    listing takes longer than SYSFS_SHARE: it began before they asked."""
    import threading

    from agent.probes.usb import ListingCache

    calls = counting_reader(monkeypatch, delay)
    root = copy_tree("all-present", tmp_path)
    ctx = ProbeContext(sysfs_root=str(root), platform="linux", usb_listing=ListingCache())
    probes = [make(name, ctx) for name in KIT]
    results = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p.name, p.run())) for p in probes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert calls == [str(root)]
    assert {name: (e.s, e.count) for name, e in results.items()} == {name: ("ok", 1) for name in KIT}


def test_shared_linux_listing_is_at_most_sysfs_share_old(tmp_path, monkeypatch):
    from agent.probes.usb import SYSFS_SHARE, ListingCache

    calls = counting_reader(monkeypatch)
    root = copy_tree("all-present", tmp_path)
    other = copy_tree("fingerprint-missing", tmp_path)
    cache = ListingCache()
    ctx = ProbeContext(sysfs_root=str(root), platform="linux", usb_listing=cache)
    fingerprint, camera = make("fingerprint", ctx), make("camera", ctx)
    assert fingerprint.run().s == "ok"
    assert camera.run().s == "ok" and len(calls) == 1  # the same moment: one listing
    unplug(root, "1-1.1")
    time.sleep(SYSFS_SHARE + 0.05)
    assert (fingerprint.run().s, len(calls)) == ("missing", 2), "an older listing is not taken"
    # another sysfs root is another listing
    elsewhere = make("fingerprint", ProbeContext(sysfs_root=str(other), platform="linux", usb_listing=cache))
    assert (elsewhere.run().s, calls[-1]) == ("missing", str(other))
    assert (make("camera", ctx).run().s, calls[-1]) == ("ok", str(root))


def test_shared_linux_listing_failure_is_each_probes_error(tmp_path):
    from agent.probes.usb import ListingCache

    ctx = ProbeContext(sysfs_root=str(tmp_path), platform="linux", usb_listing=ListingCache())
    entries = [make(name, ctx).run() for name in KIT]
    assert [(e.s, e.c) for e in entries] == [("error", "usb_unreadable")] * len(KIT)
