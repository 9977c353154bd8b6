"""card_reader: the smart-card reader through PC/SC when it can be asked, else USB presence.

PC/SC needs the optional pyscard package and a running PC/SC service (pcscd on Linux, the Smart
Card service on Windows). A reader listed by PC/SC is usable by the recording application; one
that is plugged in but not listed has a driver or service problem.
"""

from __future__ import annotations

from typing import Annotated, Callable

from msgspec import Meta, Struct, structs

from agent import wire
from agent.probes.usb import UsbOptions, UsbProbe


class PcscAnswer(Struct, frozen=True):
    readers: list[str] | None  # None: PC/SC could not be asked
    detail: str = ""  # why not


def pcsc_readers() -> PcscAnswer:
    """Reader names from the PC/SC service."""
    try:
        from smartcard.System import readers
    except ImportError:
        return PcscAnswer(None, "pyscard is not installed")
    try:
        return PcscAnswer([str(reader) for reader in readers()])
    except Exception as exc:  # noqa: BLE001 - pyscard raises several classes for "no service"
        return PcscAnswer(None, f"PC/SC: {type(exc).__name__}: {exc}"[:200])


def combine(usb: wire.DeviceEntry, answer: PcscAnswer, reader_name: str | None) -> wire.DeviceEntry:
    """Merges the USB presence entry with what PC/SC says."""
    if answer.readers is None:
        return usb
    wanted = reader_name.casefold() if reader_name else None
    matching = [name for name in answer.readers if wanted is None or wanted in name.casefold()]
    if matching:
        # PC/SC sees it, so it works, whatever the USB ids say; a swapped unit stays `warn`
        state, code, detail = (usb.s, usb.c, usb.m) if usb.s == "warn" else ("ok", "", "")
        return structs.replace(usb, s=state, c=code, m=detail, usable=True, product=matching[0][:64],
                               count=usb.count or len(matching))
    if usb.s in wire.FAILING_STATES:  # missing or error: the USB side says what is wrong, more precisely
        return structs.replace(usb, usable=False) if usb.s == "error" else usb
    listed = ", ".join(answer.readers) or "-"  # the readers PC/SC does list
    return structs.replace(usb, s="error", c="pcsc_no_reader", m=listed[:256], usable=False)


class CardReaderOptions(UsbOptions):
    # Part of the PC/SC reader name to look for, e.g. "ACR38"; any reader counts when unset.
    reader_name: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    pcsc: bool = True  # ask PC/SC when pyscard is installed


class CardReaderProbe(UsbProbe):
    type_name = "card_reader"
    Options = CardReaderOptions
    codes = UsbProbe.codes + ("pcsc_no_reader",)

    def __init__(self, name: str, options: CardReaderOptions, context):
        super().__init__(name, options, context)
        self.ask_pcsc: Callable[[], PcscAnswer] = pcsc_readers  # tests hand in another

    def run(self) -> wire.DeviceEntry:
        usb = self.presence()
        if not self.options.pcsc:
            return usb
        return combine(usb, self.ask_pcsc(), self.options.reader_name)
