"""camera: USB presence, and on Linux a V4L2 query that tells "present" from "usable"."""

from __future__ import annotations

import errno
import os
import struct
from typing import Annotated, Callable

from msgspec import Meta, Struct, structs

from agent import wire
from agent.probes.usb import UsbOptions, UsbProbe

# From linux/videodev2.h: VIDIOC_QUERYCAP = _IOR('V', 0, struct v4l2_capability), which is
# char driver[16], card[32], bus_info[32]; __u32 version, capabilities, device_caps, reserved[3].
V4L2_CAPABILITY = struct.Struct("=16s32s32sIII12x")
VIDIOC_QUERYCAP = 0x80685600
V4L2_CAP_VIDEO_CAPTURE = 0x00000001
V4L2_CAP_VIDEO_CAPTURE_MPLANE = 0x00001000
V4L2_CAP_DEVICE_CAPS = 0x80000000
assert V4L2_CAPABILITY.size == 104 and VIDIOC_QUERYCAP == (2 << 30) | (104 << 16) | (ord("V") << 8)

Ioctl = Callable[[int, int, bytearray, bool], int]


class V4l2Capability(Struct, frozen=True):
    driver: str
    card: str
    bus_info: str
    version: int
    capabilities: int
    device_caps: int

    @property
    def can_capture(self) -> bool:
        # device_caps describes this node; capabilities covers every node of the physical device
        caps = self.device_caps if self.capabilities & V4L2_CAP_DEVICE_CAPS else self.capabilities
        return bool(caps & (V4L2_CAP_VIDEO_CAPTURE | V4L2_CAP_VIDEO_CAPTURE_MPLANE))


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_capability(buf: bytes) -> V4l2Capability:
    driver, card, bus_info, version, capabilities, device_caps = V4L2_CAPABILITY.unpack(bytes(buf))
    return V4l2Capability(_cstr(driver), _cstr(card), _cstr(bus_info), version, capabilities, device_caps)


def query_capability(path: str, ioctl: Ioctl | None = None) -> V4l2Capability:
    """Opens a V4L2 node and asks what it is. Raises OSError as the kernel answers.

    QUERYCAP neither changes settings nor takes the stream, so it is safe while the recording
    application uses the camera.
    """
    if ioctl is None:
        import fcntl  # not on Windows, where this is never called

        ioctl = fcntl.ioctl
    buf = bytearray(V4L2_CAPABILITY.size)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        ioctl(fd, VIDIOC_QUERYCAP, buf, True)
    finally:
        os.close(fd)
    return parse_capability(buf)


class CameraOptions(UsbOptions):
    # Linux only: the camera's V4L2 node, e.g. /dev/video0 or, stable across replugs,
    # /dev/v4l/by-id/usb-..-video-index0. A relative path is taken under `paths.dev`.
    v4l2: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


class CameraProbe(UsbProbe):
    type_name = "camera"
    Options = CameraOptions
    codes = UsbProbe.codes + ("not_usable",)

    def __init__(self, name: str, options: CameraOptions, context):
        super().__init__(name, options, context)
        self.ioctl: Ioctl | None = None  # None: the real fcntl.ioctl; tests may hand in another

    def v4l2_path(self) -> str | None:
        node = self.options.v4l2
        if node is None or os.path.isabs(node):
            return node
        return os.path.join(self.context.dev_root, node)

    def run(self) -> wire.DeviceEntry:
        entry = self.presence()
        path = self.v4l2_path()
        if path is None or entry.s not in ("ok", "warn") or self.platform() != "linux":
            return entry
        try:
            cap = query_capability(path, self.ioctl)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.EACCES:
                why = "permission denied (add the agent's user to the video group)"
            return structs.replace(entry, s="error", c="not_usable", m=f"{path}: {why}"[:256], usable=False)
        if not cap.can_capture:
            # a UVC camera also makes a metadata node (often /dev/video1) that cannot capture
            detail = f"{path}: {cap.card or cap.driver} is not a video capture node"
            return structs.replace(entry, s="error", c="not_usable", m=detail[:256], usable=False)
        return structs.replace(entry, usable=True)
