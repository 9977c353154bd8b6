"""The probe interface. One module per probe type; the runner knows nothing else about them."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from msgspec import Struct

from agent import wire


class ProbeContext(Struct):
    """Where probes look for the system. Tests and the demo point these at fixture trees."""

    sysfs_root: str = "/sys"
    dev_root: str = "/dev"
    platform: str = sys.platform
    usb_listing: Any = None  # a probes.usb.ListingCache shared by the USB probes of one agent


class Probe:
    """Checks one thing and returns a wire entry describing it.

    `run` is called from a worker thread with a timeout; it may block on I/O but must not
    keep global state. An exception from `run` marks only this probe as `error`.
    """

    type_name: ClassVar[str]
    entry_type: ClassVar[type[wire.Entry]]
    # Reason codes this probe sends in `c`; each has words in agent/messages.py.
    codes: ClassVar[tuple[str, ...]] = ()
    # Codes any probe may get from the runner.
    RUNNER_CODES: ClassVar[tuple[str, ...]] = ("probe_failed", "timeout")

    class Options(Struct, forbid_unknown_fields=True):
        pass

    def __init__(self, name: str, options: Any, context: ProbeContext):
        self.name = name
        self.options = options
        self.context = context

    def run(self) -> wire.Entry:
        raise NotImplementedError

    def change_key(self, entry: wire.Entry) -> tuple:
        """What must differ between two results for a report to go out at once."""
        return (entry.s, entry.c)

    def failed(self, code: str, detail: str = "") -> wire.Entry:
        return self.entry_type(s="error", c=code, m=detail[:256])

    def close(self) -> None:
        pass


def worst(states: list[str]) -> str:
    """The most severe of several states (ok < warn < missing < error)."""
    order = {state: rank for rank, state in enumerate(wire.STATES)}
    return max(states, key=order.__getitem__, default="ok")
