"""Publishing: the MQTT connection, the retained status, and draining the outbox.

paho-mqtt runs the network thread and its own reconnect backoff. Its callbacks only flip
flags and queue PUBACKs; a sender thread owns the outbox and hands reports to paho, live ones
first, so a long backlog after an outage never holds back what is happening now.
"""

from __future__ import annotations

import logging
import platform
import socket
import sqlite3
import ssl
import sys
import threading
import time
from collections import deque

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__, wire
from agent.logutil import RateLimitedLog
from agent.outbox import Outbox, Row

log = logging.getLogger("ektp.agent.mqtt")

# Backlog may fill the in-flight window only up to this many slots short of the limit,
# so a live report always has room.
LIVE_RESERVE = 2
# A report queued this recently before the agent's first connection was not held back by an
# outage, only by start-up, so it is sent as live, not replayed.
REPLAY_GRACE = 5.0
REFUSED_RETRY = 30.0  # seconds before reports the broker refused are offered again


def os_label() -> str:
    return f"{platform.system().lower()} {platform.release()}"[:64]


def build_tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """Verification on, host name checked; a CA file replaces the system store when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(cert, key)
    return context


def connect_failure() -> str:
    """Why paho could not connect, in words. paho calls on_connect_fail inside its
    `except OSError`, so the exception is still at hand there."""
    exc = sys.exc_info()[1]
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's TLS certificate was not accepted ({exc.verify_message})"
    return f"{type(exc).__name__}: {exc}" if exc else "unknown error"


class Publisher:
    def __init__(self, config, kit: wire.KitId, boot: str, heartbeat: int, outbox: Outbox, clock):
        self.cfg = config.raw.broker
        self.broker = config.broker
        self.kit = kit
        self.boot = boot
        self.heartbeat = heartbeat
        self.outbox = outbox
        self.clock = clock
        self.status_topic = wire.topic(kit, "status")
        self.connects = 0
        self.connected = threading.Event()
        self._rlog = RateLimitedLog(log)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._acks: deque[int] = deque()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._handed: set[int] = set()  # row ids paho holds until PUBACK
        self._inflight_lock = threading.Lock()
        self._backlog_end = 0  # rows up to this id were queued before the current connection
        self._backlog_cursor = 0
        self._live_cursor = 0
        self._pause_until = 0.0
        self._recent: deque[tuple[int, float]] = deque(maxlen=64)  # (row id, monotonic put time)
        self._sender: threading.Thread | None = None
        self.client = self._make_client(config.password)

    # -- client setup ------------------------------------------------------------------------

    def _make_client(self, password) -> paho.Client:
        v5 = self.cfg.protocol == "5"
        client_id = self.cfg.client_id or f"ektp-agent-{self.kit.kabupaten}-{self.kit.kecamatan}-{self.kit.kit}"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=True,
        )
        client.max_inflight_messages_set(self.cfg.max_inflight + 2)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=self.cfg.reconnect_max_delay)
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, password.reveal() if password else None)
        if self.broker.tls:
            tls = self.cfg.tls
            client.tls_set_context(build_tls_context(tls.ca, tls.cert, tls.key))
        will = wire.encode(wire.Status(v=wire.SCHEMA_VERSION, state="offline", boot=self.boot, reason="lost"))
        will_props = None
        if v5 and self.cfg.will_delay:
            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.WillDelayInterval = self.cfg.will_delay
        client.will_set(self.status_topic, will, qos=1, retain=True, properties=will_props)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _connect_properties(self) -> Properties | None:
        if self.cfg.protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)
        # The session must outlive a short drop for the will delay to mean anything.
        props.SessionExpiryInterval = max(self.cfg.will_delay, 0) + self.cfg.keepalive
        return props

    def birth(self) -> bytes:
        return wire.encode(wire.Status(
            v=wire.SCHEMA_VERSION, state="online", boot=self.boot, ts=round(self.clock.time(), 3),
            agent=__version__, connects=self.connects, hb=self.heartbeat,
            host=socket.gethostname()[:64], os=os_label(),
        ))

    # -- paho callbacks (network thread: no blocking I/O here) -------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._rlog.warning("refused", "broker %s:%d refused the connection: %s",
                               self.broker.host, self.broker.port, reason_code)
            return
        self.connects += 1
        self._rlog.reset("refused")
        self._rlog.reset("connect")
        log.info("connected to %s:%d (connect #%d)", self.broker.host, self.broker.port, self.connects)
        client.publish(self.status_topic, self.birth(), qos=1, retain=True)
        self.connected.set()
        self._wake.set()

    def _on_connect_fail(self, client, userdata):
        self._rlog.warning("connect", "cannot connect to %s:%d: %s; retrying with backoff",
                           self.broker.host, self.broker.port, connect_failure())

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._stop.is_set():
            log.warning("disconnected from %s:%d: %s", self.broker.host, self.broker.port, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._acks.append((mid, reason_code.is_failure, str(reason_code)))
        self._wake.set()

    # -- sender thread -----------------------------------------------------------------------

    def start(self) -> None:
        self.client.connect_async(
            self.broker.host, self.broker.port, keepalive=self.cfg.keepalive,
            clean_start=paho.MQTT_CLEAN_START_FIRST_ONLY if self.cfg.protocol == "5" else True,
            properties=self._connect_properties(),
        )
        self.client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="sender", daemon=True)
        self._sender.start()

    def notify(self, rowid: int) -> None:
        """A new report is in the outbox."""
        self._recent.append((rowid, time.monotonic()))
        self._wake.set()

    def _backlog_boundary(self) -> int:
        end = self.outbox.max_id()
        if self.connects > 1:
            return end
        now = time.monotonic()
        for rowid, put in reversed(list(self._recent)):
            if now - put >= REPLAY_GRACE:
                break
            end = min(end, rowid - 1)
        return end

    def _send_loop(self) -> None:
        was_connected = False
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._process_acks()
                connected = self.connected.is_set()
                if connected and not was_connected:
                    # everything queued until now is backlog, sent flagged as replayed
                    self._backlog_end = self._backlog_boundary()
                    self._rlog.reset("read")
                    self._live_cursor = max(self._live_cursor, self._backlog_end)
                was_connected = connected
                if connected:
                    self._hand_over()
            except Exception:  # noqa: BLE001 - keep draining whatever happens to one row
                log.exception("sending reports")
                self._stop.wait(1.0)

    def _process_acks(self) -> None:
        done = []
        while self._acks:
            mid, refused, reason = self._acks.popleft()
            with self._inflight_lock:
                rowid = self._inflight.pop(mid, None)
                if rowid is not None:
                    self._handed.discard(rowid)
            if rowid is None:
                continue
            if not refused:
                done.append(rowid)
                continue
            # The broker refused it (e.g. "Not authorized": a username that does not match the
            # kit's topic in its ACL). Keep it and send it again later, as backlog.
            self._rlog.warning("puback", "the broker refused a report: %s; it stays queued (check the broker "
                               "username and ACL for %s)", reason, self.status_topic.rsplit("/", 1)[0])
            self._backlog_cursor = min(self._backlog_cursor, rowid - 1) if rowid > 0 else self._backlog_cursor
            self._backlog_end = max(self._backlog_end, rowid)
            self._pause_until = time.monotonic() + REFUSED_RETRY
        self.outbox.delete(done)

    def _hand_over(self) -> None:
        limit = self.cfg.max_inflight
        if time.monotonic() < self._pause_until:
            return
        while self.connected.is_set():
            with self._inflight_lock:
                room = limit - len(self._inflight)
                handed = set(self._handed)
            if room <= 0:
                return
            held = self.outbox.memory_rows(skip=handed, limit=room)  # the disk refused these: live
            if held:
                for row in held:
                    self._publish(row, replay=False)
                continue
            try:
                live = self.outbox.next_after(self._live_cursor, skip=handed, limit=room)
            except sqlite3.Error as exc:
                self._rlog.warning("read", "cannot read the report queue: %s", exc)
                return
            if live:
                for row in live:
                    self._publish(row, replay=False)
                    self._live_cursor = row.id
                continue
            room -= LIVE_RESERVE
            if room <= 0 or self._backlog_cursor >= self._backlog_end:
                return
            backlog = self.outbox.next_after(self._backlog_cursor, upto=self._backlog_end, skip=handed, limit=room)
            if not backlog:
                self._backlog_cursor = self._backlog_end
                return
            for row in backlog:
                self._publish(row, replay=True)
                self._backlog_cursor = row.id

    def _publish(self, row: Row, replay: bool) -> None:
        payload = row.payload
        if replay:
            payload = mark_replayed(payload, self.cfg.compress)
        with self._inflight_lock:
            info = self.client.publish(row.topic, payload, qos=1)
            if info.rc == paho.MQTT_ERR_SUCCESS or info.rc == paho.MQTT_ERR_NO_CONN:
                # paho keeps a QoS 1 message across reconnects and resends it itself
                self._inflight[info.mid] = row.id
                self._handed.add(row.id)
            else:
                log.warning("publish failed: %s", paho.error_string(info.rc))

    # -- stop --------------------------------------------------------------------------------

    def stop(self, timeout: float = 3.0) -> None:
        """Say offline (reason shutdown) if connected, then disconnect."""
        self._stop.set()
        self._wake.set()
        if self._sender:
            self._sender.join(timeout)
        if self.connected.is_set():
            status = wire.Status(v=wire.SCHEMA_VERSION, state="offline", boot=self.boot,
                                 ts=round(self.clock.time(), 3), reason="shutdown")
            info = self.client.publish(self.status_topic, wire.encode(status), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def inflight(self) -> int:
        with self._inflight_lock:
            return len(self._inflight)


def mark_replayed(payload: bytes, compress: bool) -> bytes:
    report = wire.decode_report(payload)
    report.replay = True
    return wire.encode(report, compress=compress)
