"""The device catalogue (config/devices.yaml) and names for USB ids from usb.ids.

The catalogue lists candidate USB ids per device kind, each with the source it was taken from.
It is not a list of what ships in e-KTP kits: a site checks its own devices with lsusb or Device
Manager and puts their ids in the agent config. usb.ids, when installed, names devices that the
catalogue does not know, for `ektp-agent check`.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Annotated, Any, Iterable

import msgspec
import yaml
from msgspec import Meta, Struct

DEFAULT_CATALOGUE = Path(__file__).resolve().parent.parent / "config" / "devices.yaml"

# Where distributions install usb.ids (Debian: usb.ids/hwdata packages; Fedora: hwdata).
USB_IDS_PATHS: tuple[str, ...] = (
    "/usr/share/hwdata/usb.ids",
    "/usr/share/misc/usb.ids",
    "/var/lib/usbutils/usb.ids",
    "/usr/share/usb.ids",
    "/usr/local/share/usb.ids",
)

CatalogueId = Annotated[str, Meta(pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$")]
Words = Annotated[str, Meta(min_length=1, max_length=200)]


class CatalogueError(ValueError):
    pass


class CatalogueEntry(Struct, frozen=True, forbid_unknown_fields=True):
    id: CatalogueId  # "vvvv:pppp"
    vendor: Words
    product: Words
    source: Words  # where the id comes from: a usb.ids version, a vendor document
    note: str = ""


class KindCatalogue(Struct, frozen=True, forbid_unknown_fields=True):
    candidates: list[CatalogueEntry] = []
    note: str = ""


class Catalogue(Struct, frozen=True, forbid_unknown_fields=True):
    note: Words
    kinds: dict[str, KindCatalogue]
    sources: dict[str, str] = {}  # named sources, referred to with YAML anchors

    def lookup(self, vid: str, pid: str) -> list[tuple[str, CatalogueEntry]]:
        """(kind, entry) for every catalogue entry with this id."""
        wanted = f"{vid}:{pid}".lower()
        return [(kind, entry) for kind, body in self.kinds.items()
                for entry in body.candidates if entry.id == wanted]

    def ids(self, kind: str) -> list[str]:
        body = self.kinds.get(kind)
        return [entry.id for entry in body.candidates] if body else []


def parse_catalogue(data: Any, where: str = "catalogue") -> Catalogue:
    try:
        return msgspec.convert(data, Catalogue, strict=True)
    except msgspec.ValidationError as exc:
        raise CatalogueError(f"{where}: {exc}") from None


def load_catalogue(path: str | os.PathLike = DEFAULT_CATALOGUE) -> Catalogue:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{path}: not valid YAML: {exc}") from None
    return parse_catalogue(data, str(path))


# ---------------------------------------------------------------------------------------------
# usb.ids


class UsbIds(Struct, frozen=True):
    version: str | None  # from the "# Version:" header line
    vendors: dict[str, str]  # "046d" -> "Logitech, Inc."
    products: dict[str, str]  # "046d:082d" -> "HD Pro Webcam C920"


_VENDOR_LINE = re.compile(r"^([0-9a-f]{4})  (.+)$")
_PRODUCT_LINE = re.compile(r"^\t([0-9a-f]{4})  (.+)$")
_VERSION_LINE = re.compile(r"^#\s*Version:\s*(\S+)")


def parse_usb_ids(lines: Iterable[str]) -> UsbIds:
    """Vendors and products from usb.ids text; the class, HID and language tables are skipped."""
    vendors: dict[str, str] = {}
    products: dict[str, str] = {}
    version = None
    vendor = None  # the vendor whose product lines follow
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            continue
        if line.startswith("#"):
            if version is None and (match := _VERSION_LINE.match(line)):
                version = match.group(1)
            continue
        if match := _VENDOR_LINE.match(line):
            vendor = match.group(1)
            vendors[vendor] = match.group(2).strip()
        elif match := _PRODUCT_LINE.match(line):
            if vendor is not None:
                products[f"{vendor}:{match.group(1)}"] = match.group(2).strip()
        elif not line.startswith("\t"):
            vendor = None  # a "C 00 ..." or other table starts: its tab lines are not products
    return UsbIds(version, vendors, products)


class UsbNamer:
    """Names USB ids from the first usb.ids found; the file is parsed once, on first use."""

    def __init__(self, paths: Iterable[str | os.PathLike] = USB_IDS_PATHS):
        self.paths = tuple(str(p) for p in paths)
        self._lock = threading.Lock()
        self._loaded = False
        self._ids: UsbIds | None = None
        self.path: str | None = None  # the file that was used

    def database(self) -> UsbIds | None:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                for path in self.paths:
                    try:
                        with open(path, encoding="utf-8", errors="replace") as fh:
                            self._ids = parse_usb_ids(fh)
                    except OSError:
                        continue
                    self.path = path
                    break
            return self._ids

    def name(self, vid: str, pid: str) -> str | None:
        """"Vendor Product", the vendor alone, or None when usb.ids is missing or lacks the vendor."""
        ids = self.database()
        if ids is None:
            return None
        vid, pid = vid.lower(), pid.lower()
        vendor = ids.vendors.get(vid)
        product = ids.products.get(f"{vid}:{pid}")
        if vendor and product:
            return f"{vendor} {product}"
        return vendor or product


def describe_usb(vid: str, pid: str, catalogue: Catalogue | None = None,
                 namer: UsbNamer | None = None) -> str | None:
    """A name for a USB id: the catalogue's (with its kind), else usb.ids', else None."""
    if catalogue is not None:
        found = catalogue.lookup(vid, pid)
        if found:
            kind, entry = found[0]
            return f"{entry.vendor} {entry.product} ({kind} candidate)"
    return namer.name(vid, pid) if namer is not None else None
