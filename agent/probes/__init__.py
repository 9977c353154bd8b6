"""Probe registry: probe type name -> class, and the default type for a probe name.

A probe type's module is imported the first time its class is asked for, so an agent loads only
the probes its config uses, with their libraries (psutil for host and link, pyserial for ups).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module

from agent.probes.base import Probe, ProbeContext

# type name -> "module:class"; each class's type_name is its key (tests/test_agent_imports.py checks)
_CLASSES: dict[str, str] = {
    "host": "agent.probes.host:HostProbe",
    "link": "agent.probes.link:LinkProbe",
    "usb": "agent.probes.usb:UsbProbe",
    "camera": "agent.probes.camera:CameraProbe",
    "card_reader": "agent.probes.card_reader:CardReaderProbe",
    "ups": "agent.probes.ups:UpsProbe",
}


class _Registry(Mapping):
    def __getitem__(self, type_name: str) -> type[Probe]:
        module, _, name = _CLASSES[type_name].partition(":")
        return getattr(import_module(module), name)

    def __iter__(self) -> Iterator[str]:
        return iter(_CLASSES)

    def __len__(self) -> int:
        return len(_CLASSES)


REGISTRY: Mapping[str, type[Probe]] = _Registry()

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
