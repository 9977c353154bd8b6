"""Probe registry: probe type name -> class, and the default type for a probe name."""

from __future__ import annotations

from agent.probes.base import Probe, ProbeContext
from agent.probes.host import HostProbe
from agent.probes.link import LinkProbe

REGISTRY: dict[str, type[Probe]] = {cls.type_name: cls for cls in (HostProbe, LinkProbe)}

# A probe named after a device kind gets that kind's probe type without saying `type:`.
DEFAULT_TYPES: dict[str, str] = {}


def default_type(name: str) -> str:
    return DEFAULT_TYPES.get(name, name)


def create(spec, context: ProbeContext) -> Probe:
    return REGISTRY[spec.type](spec.name, spec.options, context)


__all__ = ["Probe", "ProbeContext", "REGISTRY", "create", "default_type"]
