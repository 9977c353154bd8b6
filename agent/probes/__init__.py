"""Probe registry: probe type name -> class, and the default type for a probe name."""

from __future__ import annotations

from agent.probes.base import Probe, ProbeContext
from agent.probes.camera import CameraProbe
from agent.probes.card_reader import CardReaderProbe
from agent.probes.host import HostProbe
from agent.probes.link import LinkProbe
from agent.probes.ups import UpsProbe
from agent.probes.usb import UsbProbe

REGISTRY: dict[str, type[Probe]] = {
    cls.type_name: cls for cls in (HostProbe, LinkProbe, UsbProbe, CameraProbe, CardReaderProbe, UpsProbe)
}

# A probe named after a device kind gets that kind's probe type without saying `type:`.
DEFAULT_TYPES: dict[str, str] = {
    "fingerprint": "usb",
    "iris": "usb",
    "signature_pad": "usb",
    "camera": "camera",
    "card_reader": "card_reader",
    "ups": "ups",
}


def default_type(name: str) -> str:
    return DEFAULT_TYPES.get(name, name)


def create(spec, context: ProbeContext) -> Probe:
    return REGISTRY[spec.type](spec.name, spec.options, context)


__all__ = ["Probe", "ProbeContext", "REGISTRY", "create", "default_type"]
