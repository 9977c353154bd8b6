"""host: the kit PC itself (CPU, memory, disks, temperatures, boot time, clock skew)."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import psutil
from msgspec import Meta, Struct

from agent import wire
from agent.probes.base import Probe, worst

Ratio = Annotated[float, Meta(ge=0, le=1)]


def _default_mounts() -> list[str]:
    return ["C:\\"] if sys.platform == "win32" else ["/"]


class HostOptions(Struct, forbid_unknown_fields=True):
    mounts: Annotated[list[str], Meta(max_length=16)] = []  # default: the system disk
    disk_free_min: Ratio = 0.05  # warn below this free ratio
    temperatures: bool = True
    # An http(s) URL whose server clock is trusted (e.g. the district server); the skew is read
    # from its Date header, so it needs no NTP. Leave empty to skip the check.
    clock_reference: str | None = None
    clock_skew_max: Annotated[float, Meta(gt=0)] = 120.0  # warn past this many seconds


def parse_http_date(value: str | None) -> float | None:
    import email.utils  # only with a clock reference: keeps the agent lean otherwise

    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def clock_skew(url: str, timeout: float, now=time.time) -> float:
    """Seconds this clock is ahead of the server at `url`, from its HTTP Date header.

    The header has one-second resolution; the request's midpoint is compared with the server's
    second plus one half, so the error is within about half a second plus half the round trip.
    """
    import ssl
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "ektp-agent"})
    context = ssl.create_default_context()
    start = now()
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            header = response.headers.get("Date")
    except urllib.error.HTTPError as exc:  # an error page still carries the server's clock
        header = exc.headers.get("Date")
    end = now()
    server = parse_http_date(header)
    if server is None:
        raise ValueError(f"{url} sent no usable Date header")
    return round((start + end) / 2 - (server + 0.5), 1)


class HostProbe(Probe):
    type_name = "host"
    entry_type = wire.HostEntry
    Options = HostOptions
    codes = ("disk_unreadable", "disk_low", "clock_unchecked", "clock_skew")

    def __init__(self, name, options, context):
        super().__init__(name, options, context)
        psutil.cpu_percent(interval=None)  # primes the counter; the next call covers the interval

    def run(self) -> wire.HostEntry:
        opts: HostOptions = self.options
        states, codes, details = ["ok"], [], []
        memory = psutil.virtual_memory()
        disks = {}
        for mount in opts.mounts or _default_mounts():
            try:
                usage = psutil.disk_usage(mount)
            except OSError as exc:
                states.append("error")
                codes.append("disk_unreadable")
                details.append(f"{mount}: {exc.strerror or exc}")
                continue
            disks[mount[:64]] = wire.Disk(usage.free, usage.total)
            if usage.total and usage.free / usage.total < opts.disk_free_min:
                states.append("warn")
                codes.append("disk_low")
                details.append(mount)
        skew = None
        if opts.clock_reference:
            try:
                skew = clock_skew(opts.clock_reference, timeout=5.0)
            except (OSError, ValueError) as exc:
                states.append("warn")
                codes.append("clock_unchecked")
                details.append(str(getattr(exc, "reason", exc)))
            else:
                if abs(skew) > opts.clock_skew_max:
                    states.append("warn")
                    codes.append("clock_skew")
                    details.append(f"{skew:+.0f} s")
        state = worst(states)
        return wire.HostEntry(
            s=state,
            c=codes[0] if codes else "",
            m="; ".join(details)[:256],
            cpu=round(min(psutil.cpu_percent(interval=None) / 100.0, 1.0), 3),
            mem_avail=memory.available,
            mem_total=memory.total,
            disks=disks,
            temps=self._temperatures() if opts.temperatures else {},
            boot=float(int(psutil.boot_time())),
            skew=skew,
        )

    @staticmethod
    def _temperatures() -> dict[str, float]:
        read = getattr(psutil, "sensors_temperatures", None)
        if read is None:  # Windows and macOS builds have no sensor API
            return {}
        try:
            chips = read()
        except OSError:
            return {}
        temps: dict[str, float] = {}
        for chip, sensors in sorted(chips.items()):
            for index, sensor in enumerate(sensors):
                label = f"{chip}/{sensor.label or index}"[:64]
                if len(temps) < 16 and sensor.current is not None:
                    temps[label] = round(float(sensor.current), 1)
        return temps
