"""A counting TCP proxy on loopback: put between a client and the broker, it counts the bytes in
both directions, the TCP segments the kernel sent and received on the client's connection
(TCP_INFO), and names what went by: MQTT packets on a plain connection, TLS records on a TLS one.

`freeze()` stops forwarding without closing anything, as a link that silently goes dead does.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

IP_TCP_HEADER = 52  # IPv4 20 + TCP 20 + timestamp option 12 bytes per segment (Linux default)

MQTT_TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
              8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
              14: "DISCONNECT", 15: "AUTH"}
TLS_TYPES = {20: "tls_change_cipher_spec", 21: "tls_alert", 22: "tls_handshake", 23: "tls_application_data"}


def tcp_segments(sock: socket.socket) -> tuple[int, int] | None:
    """(segments out, segments in) of a connected socket, from Linux's struct tcp_info."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < 144:
        return None
    return struct.unpack_from("<II", info, 136)


@dataclass
class Packet:
    at: float  # time.monotonic()
    up: bool  # client -> broker
    kind: str
    size: int  # bytes on the wire (whole MQTT packet or TLS record)
    topic: str = ""


class _Parser:
    """Splits one direction's byte stream into MQTT packets or TLS records."""

    def __init__(self, tls: bool):
        self.tls = tls
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, int, str]]:
        self.buf += data
        out = []
        while True:
            item = self._tls() if self.tls else self._mqtt()
            if item is None:
                return out
            out.append(item)

    def _tls(self):
        if len(self.buf) < 5:
            return None
        length = struct.unpack_from(">H", self.buf, 3)[0]
        if len(self.buf) < 5 + length:
            return None
        kind = TLS_TYPES.get(self.buf[0], f"tls_{self.buf[0]}")
        del self.buf[:5 + length]
        return kind, 5 + length, ""

    def _mqtt(self):
        if len(self.buf) < 2:
            return None
        remaining, multiplier, i = 0, 1, 1
        while True:
            if i >= len(self.buf):
                return None
            byte = self.buf[i]
            remaining += (byte & 0x7F) * multiplier
            multiplier *= 128
            i += 1
            if not byte & 0x80:
                break
        total = i + remaining
        if len(self.buf) < total:
            return None
        kind = MQTT_TYPES.get(self.buf[0] >> 4, "?")
        topic = ""
        if kind == "PUBLISH" and remaining >= 2:
            n = struct.unpack_from(">H", self.buf, i)[0]
            topic = bytes(self.buf[i + 2:i + 2 + n]).decode(errors="replace")
        del self.buf[:total]
        return kind, total, topic


@dataclass
class Conn:
    client: socket.socket
    upstream: socket.socket
    opened: float
    bytes_up: int = 0
    bytes_down: int = 0
    segments: tuple[int, int] = (0, 0)  # kept at close
    closed: bool = False
    upstream_closed_at: float | None = None  # when the broker's side ended (EOF or error)
    packets: list[Packet] = field(default_factory=list)

    def segs(self) -> tuple[int, int]:
        if not self.closed:
            seen = tcp_segments(self.client)
            if seen is not None:
                self.segments = seen
        return self.segments


class CountingProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", tls: bool = False):
        self.upstream = (upstream_host, upstream_port)
        self.tls = tls
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[Conn] = []
        self.lock = threading.Lock()
        self.running = threading.Event()  # set: forwarding; clear: frozen
        self.running.set()
        self.stopped = False
        self.listeners: list = []  # called with each Packet
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()

    def url(self, tls: bool | None = None) -> str:
        return f"{'mqtts' if (self.tls if tls is None else tls) else 'mqtt'}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(client, upstream, time.monotonic())
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._pump, args=(conn, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, False), daemon=True).start()

    def _pump(self, conn: Conn, up: bool) -> None:
        src, dst = (conn.client, conn.upstream) if up else (conn.upstream, conn.client)
        parser = _Parser(self.tls)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.running.wait()  # frozen: hold the data, as a dead link would
                if self.stopped:
                    break
                now = time.monotonic()
                with self.lock:
                    if up:
                        conn.bytes_up += len(data)
                    else:
                        conn.bytes_down += len(data)
                    for kind, size, topic in parser.feed(data):
                        packet = Packet(now, up, kind, size, topic)
                        conn.packets.append(packet)
                        for listener in self.listeners:
                            listener(conn, packet)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not up and conn.upstream_closed_at is None:
                conn.upstream_closed_at = time.monotonic()
            with self.lock:
                if not conn.closed:
                    conn.segs()
                    conn.closed = True
            for s in (conn.client, conn.upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def freeze(self) -> None:
        self.running.clear()

    def thaw(self) -> None:
        self.running.set()

    def totals(self) -> dict:
        """Bytes both ways, segments both ways and packets so far, over every connection."""
        with self.lock:
            up = sum(c.bytes_up for c in self.conns)
            down = sum(c.bytes_down for c in self.conns)
            segs = [c.segs() for c in self.conns]
            packets = sum(len(c.packets) for c in self.conns)
        seg_out = sum(s[0] for s in segs)  # proxy -> client = broker -> client
        seg_in = sum(s[1] for s in segs)
        return {"at": time.monotonic(), "up": up, "down": down, "payload": up + down, "segments": seg_out + seg_in,
                "ip": up + down + IP_TCP_HEADER * (seg_out + seg_in), "packets": packets}

    def packets(self, since: float = 0.0, until: float = float("inf")) -> list[Packet]:
        with self.lock:
            return [p for c in self.conns for p in c.packets if since <= p.at < until]

    def close(self) -> None:
        self.stopped = True
        self.running.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            for s in (conn.client, conn.upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in ("at", "up", "down", "payload", "segments", "ip", "packets")}
