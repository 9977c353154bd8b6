"""link: the network path to the district (TCP connect or ICMP echo per target, interfaces)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import psutil
from msgspec import Meta, Struct

from agent import wire
from agent.probes.base import Probe


class TargetOptions(Struct, forbid_unknown_fields=True):
    host: Annotated[str, Meta(min_length=1, max_length=253)]
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None  # set: TCP connect; unset: ICMP echo
    method: Literal["tcp", "icmp"] | None = None


class LinkOptions(Struct, forbid_unknown_fields=True):
    targets: Annotated[dict[wire.Slug, TargetOptions], Meta(min_length=1, max_length=16)]
    interfaces: Annotated[list[str], Meta(max_length=16)] = []  # interfaces that must be up
    count: Annotated[int, Meta(ge=1, le=10)] = 3  # probes per target per run
    attempt_timeout: Annotated[float, Meta(gt=0, le=30)] = 2.0
    icmp: Literal["auto", "socket", "command"] = "auto"


class Attempt(Struct):
    ok: bool
    rtt: float | None = None
    error: str = ""


def tcp_attempt(host: str, port: int, timeout: float) -> Attempt:
    start = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Attempt(True, time.perf_counter() - start)
    except OSError as exc:
        return Attempt(False, error=str(exc.strerror or exc))


_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_socket_available() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
        return True
    except OSError:
        return False


def icmp_socket_attempt(host: str, timeout: float, seq: int) -> Attempt:
    """One echo over an unprivileged ICMP datagram socket (Linux ping_group_range, macOS)."""
    address = socket.gethostbyname(host)
    payload = b"ektp-agent"
    header = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, 0, 0, seq)
    packet = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, _checksum(header + payload), 0, seq) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) as sock:
        start = time.perf_counter()
        deadline = start + timeout
        sock.sendto(packet, (address, 0))
        while (left := deadline - time.perf_counter()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(1024)
            except socket.timeout:
                break
            if len(data) >= 8:
                kind, _, _, _, reply_seq = struct.unpack("!BBHHH", data[:8])
                if kind == _ICMP_ECHO_REPLY and reply_seq == seq:
                    return Attempt(True, time.perf_counter() - start)
    return Attempt(False, error="no echo reply")


# "time=0.218 ms" (Linux), "time<1ms" / "waktu=3ms" (Windows, localised)
_PING_RTT = re.compile(r"[=<]\s*(\d+(?:[.,]\d+)?)\s*ms", re.IGNORECASE)


def parse_ping_output(text: str, returncode: int) -> Attempt:
    if returncode != 0 or "TTL=" not in text.upper():
        line = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "no reply")
        return Attempt(False, error=line.strip()[:120])
    match = _PING_RTT.search(text)
    rtt = float(match.group(1).replace(",", ".")) / 1000.0 if match else None
    return Attempt(True, rtt)


def icmp_command_attempt(host: str, timeout: float) -> Attempt:
    """One echo through the system ping, which carries its own privilege."""
    ping = shutil.which("ping")
    if ping is None:
        return Attempt(False, error="no ping command")
    if sys.platform == "win32":
        args = [ping, "-n", "1", "-w", str(max(1, int(timeout * 1000))), host]
    else:
        args = [ping, "-n", "-c", "1", "-W", str(max(1, round(timeout))), host]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 2,
                              env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        return Attempt(False, error="ping timed out")
    except OSError as exc:  # e.g. not allowed to start ping: only this target fails
        return Attempt(False, error=f"cannot run ping: {exc.strerror or exc}")
    return parse_ping_output(done.stdout + done.stderr, done.returncode)


def median(values: list[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count). Not statistics.median:
    importing `statistics` (with `fractions`) would cost the agent 0.25 MB for this one line."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


class _Counter:
    def __init__(self):
        self.sent = 0
        self.recv = 0


class LinkProbe(Probe):
    type_name = "link"
    entry_type = wire.LinkEntry
    Options = LinkOptions
    codes = ("no_answer", "target_down", "interface_down")

    def __init__(self, name, options, context):
        super().__init__(name, options, context)
        self._counters = {target: _Counter() for target in options.targets}
        self._pool = ThreadPoolExecutor(max_workers=len(options.targets), thread_name_prefix=f"{name}-target")
        self._lock = threading.Lock()
        self._seq = 0
        mode = options.icmp
        self._icmp_socket = mode == "socket" or (mode == "auto" and icmp_socket_available())

    def _attempt(self, target: TargetOptions) -> tuple[Attempt, str]:
        method = target.method or ("tcp" if target.port else "icmp")
        timeout = self.options.attempt_timeout
        if method == "tcp":
            return tcp_attempt(target.host, target.port or 443, timeout), "tcp"
        if self._icmp_socket:
            with self._lock:
                self._seq = (self._seq + 1) & 0xFFFF
                seq = self._seq
            try:
                return icmp_socket_attempt(target.host, timeout, seq), "icmp"
            except OSError as exc:
                return Attempt(False, error=str(exc.strerror or exc)), "icmp"
        return icmp_command_attempt(target.host, timeout), "icmp"

    def _probe_target(self, name: str, target: TargetOptions) -> tuple[wire.LinkTarget, str]:
        counter = self._counters[name]
        rtts: list[float] = []
        answered = 0
        via = "tcp"
        last_error = ""
        for _ in range(self.options.count):
            attempt, via = self._attempt(target)
            counter.sent += 1
            if attempt.ok:
                answered += 1
                counter.recv += 1
                if attempt.rtt is not None:
                    rtts.append(attempt.rtt)
            else:
                last_error = attempt.error
        rtt = round(median(rtts), 5) if rtts else None
        return wire.LinkTarget(up=answered > 0, rtt=rtt, sent=counter.sent, recv=counter.recv, via=via), last_error

    def run(self) -> wire.LinkEntry:
        opts: LinkOptions = self.options
        # targets are probed side by side so one dead server does not delay the others
        futures = {name: self._pool.submit(self._probe_target, name, target) for name, target in opts.targets.items()}
        targets: dict[str, wire.LinkTarget] = {}
        errors: list[str] = []
        for name, future in futures.items():
            targets[name], error = future.result()
            if not targets[name].up:
                errors.append(f"{name}: {error}")
        down = [name for name, t in targets.items() if not t.up]
        ifaces = self._interfaces(opts.interfaces)
        ifaces_down = [name for name, up in ifaces.items() if not up]
        if len(down) == len(targets):
            state, code = "error", "no_answer"
        elif down or ifaces_down:
            state, code = "warn", "target_down" if down else "interface_down"
        else:
            state, code = "ok", ""
        detail = "; ".join(errors + [f"{name}: down" for name in ifaces_down])
        return wire.LinkEntry(s=state, c=code, m=detail[:256], targets=targets, ifaces=ifaces)

    @staticmethod
    def _interfaces(names: list[str]) -> dict[str, bool]:
        if not names:
            return {}
        stats = psutil.net_if_stats()
        return {name[:64]: bool(name in stats and stats[name].isup) for name in names}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def change_key(self, entry: wire.LinkEntry) -> tuple:
        return (
            entry.s,
            entry.c,
            tuple(sorted((name, t.up) for name, t in entry.targets.items())),
            tuple(sorted(entry.ifaces.items())),
        )
