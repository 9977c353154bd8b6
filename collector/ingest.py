"""MQTT ingest: paho's network thread only queues messages; one worker decodes and applies them.

The worker takes messages in batches, applies each through the wire module and the fleet,
writes history and the reports taken in one transaction, and only then acknowledges the batch
(manual PUBACK), so a collector killed mid-batch gets those reports again from the broker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import wire
from agent.logutil import RateLimitedLog
from agent.mqtt import build_tls_context, connect_failure
from collector.config import LoadedCollectorConfig
from collector.fleet import Event, Fleet, Ledger, Refused
from collector.store import Store

log = logging.getLogger("ektp.collector.ingest")

BATCH = 2000
INBOX_LIMIT = 50_000  # past this, paho's thread waits: the broker holds the rest
SWEEP_EVERY = 1.0
# After a start, liveness is judged only once the broker's queued messages are in (the inbox ran
# empty), or after this long, so a kit is not called offline for reports still waiting.
CATCH_UP_LIMIT = 30.0
# Kits with a change (an event) are saved with it; kits whose readings alone moved, this often:
# encoding every kit's record each 2 s cost about 20 us per report at a few thousand reports/s.
SNAPSHOT_EVERY = 15.0
FOLD_EVERY = 10.0  # full ledgers written, journal of reports taken emptied (collector/store.py)
PRUNE_EVERY = 3600.0
REFUSAL_REASONS = wire.WireError.REASONS + ("unknown_kit", "capacity", "clock")


class _ReadAhead:
    """The broker's socket as paho sees it, read 64 KiB at a time.

    paho reads a packet a few bytes per recv() (type, each length byte, body) and selects before
    each packet: three to five system calls per report, each giving up the interpreter lock to
    the worker. This answers those reads from one large read, and pending() (which paho asks of
    TLS sockets) tells its loop not to wait in select while a packet is already here.
    """

    __slots__ = ("_sock", "_buf", "_pos")

    def __init__(self, sock):
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self._sock.recv(max(size, 65536))  # BlockingIOError / EOF reach paho as before
            if len(data) <= size:
                return data
            self._buf, self._pos = data, 0
        start = self._pos
        self._pos = min(start + size, len(self._buf))
        return self._buf[start:self._pos]

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + inner

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Client(paho.Client):
    def _create_socket(self):
        return _ReadAhead(super()._create_socket())


class Ingest:
    def __init__(self, config: LoadedCollectorConfig, fleet: Fleet, store: Store,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.cfg = config.raw.broker
        self.fleet = fleet
        self.store = store
        self.clock = clock
        self.inbox: queue.Queue = queue.Queue(maxsize=INBOX_LIMIT)
        self.received = 0
        self.refused: Counter[str] = Counter({reason: 0 for reason in REFUSAL_REASONS})
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the first SUBACK arrived: messages can flow
        self.listeners: list[Callable[[list[Event], float], None]] = []
        self._stop = threading.Event()
        self._rlog = RateLimitedLog(log, every=60.0)
        self._worker: threading.Thread | None = None
        self.client: paho.Client | None = None  # made by start(); process() needs no network

    def _make_client(self) -> paho.Client:
        # _create_socket is paho's own hook (its websocket transport wraps the socket there);
        # without it, the plain client works, only slower
        factory = _Client if hasattr(paho.Client, "_create_socket") else paho.Client
        client = factory(CallbackAPIVersion.VERSION2, client_id=self.cfg.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True)
        client.reconnect_delay_set(1, 30)
        if self.cfg.username:
            password = self.config.password.reveal() if self.config.password else None
            client.username_pw_set(self.cfg.username, password)
        if self.config.broker.tls:
            tls = self.cfg.tls
            client.tls_set_context(build_tls_context(tls.ca, tls.cert, tls.key))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = lambda *args: self.subscribed.set()
        return client

    def topics(self) -> list[str]:
        kabupaten = self.cfg.kabupaten or [None]
        return [wire.subscription(kab) for kab in kabupaten]

    # -- paho callbacks: no blocking I/O ---------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._rlog.warning("refused", "broker refused the connection: %s", reason_code)
            return
        log.info("connected to %s:%d%s", self.config.broker.host, self.config.broker.port,
                 " (session resumed)" if flags.session_present else "")
        client.subscribe([(topic, 1) for topic in self.topics()])
        self.connected.set()

    def _on_connect_fail(self, client, userdata):
        self._rlog.warning("connect", "cannot connect to %s:%d: %s", self.config.broker.host,
                           self.config.broker.port, connect_failure())

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker: %s", reason_code)

    def _on_message(self, client, userdata, msg):
        self.inbox.put((msg.topic, msg.payload, msg.mid, msg.qos))

    # -- worker ----------------------------------------------------------------------------

    def start(self) -> None:
        self.client = self._make_client()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry
        props.ReceiveMaximum = self.cfg.receive_maximum
        self.client.connect_async(self.config.broker.host, self.config.broker.port, keepalive=self.cfg.keepalive,
                                  clean_start=False, properties=props)
        self.client.loop_start()
        self._worker = threading.Thread(target=self._work, name="ingest", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        last_sweep = last_snapshot = last_prune = last_fold = 0.0
        unfolded: set[tuple[wire.KitId, str]] = set()  # kit runs with reports taken since the last fold
        started = self.clock()
        caught_up = False
        while not self._stop.is_set():
            batch = []
            try:
                batch.append(self.inbox.get(timeout=0.25))
                while len(batch) < BATCH:
                    batch.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            now = self.clock()
            try:
                events = self.process(batch, now)
                seen = self.fleet.take_seen()
                unfolded.update((kit_id, boot) for kit_id, boot, _ in seen)
                if not caught_up:
                    caught_up = (self.subscribed.is_set() and self.inbox.empty()) or now - started > CATCH_UP_LIMIT
                if caught_up and now - last_sweep >= SWEEP_EVERY:
                    events += self.fleet.sweep(now)
                    last_sweep = now
                records = []
                if now - last_snapshot >= SNAPSHOT_EVERY:
                    records = self.fleet.take_dirty()
                    last_snapshot = now
                elif events:
                    records = self.fleet.take_dirty({event.kit for event in events})
                ledgers = None
                if unfolded and now - last_fold >= FOLD_EVERY:
                    ledgers = self._ledgers(unfolded)
                if events or seen or records or ledgers is not None:
                    self.store.write(events, seen, records, now, ledgers)
                if ledgers is not None:
                    unfolded.clear()
                    last_fold = now
                if now - last_prune >= PRUNE_EVERY:
                    self.store.prune(now - self.config.raw.store.history_days * 86400)
                    last_prune = now
            except Exception:  # noqa: BLE001 - the broker redelivers what was not acknowledged
                log.exception("ingest batch failed; not acknowledged, the broker will send it again")
                self._stop.wait(1.0)
                continue
            for _, _, mid, qos in batch:
                if qos:
                    self.client.ack(mid, qos)
            if events:
                for listener in self.listeners:
                    try:
                        listener(events, now)
                    except Exception:  # noqa: BLE001
                        log.exception("event listener failed")

    def _ledgers(self, runs) -> list[tuple[wire.KitId, str, Ledger]]:
        out = []
        with self.fleet.lock:  # ledgers change on this thread only; the lock guards the kit table
            for kit_id, boot in runs:
                kit = self.fleet.kits.get(kit_id)
                ledger = kit.ledgers.get(boot) if kit else None
                if ledger is not None:
                    out.append((kit_id, boot, ledger))
        return out

    def process(self, batch, now: float) -> list[Event]:
        """Applies a batch of (topic, payload, mid, qos); returns the events."""
        events: list[Event] = []
        fleet = self.fleet
        for topic, payload, _mid, _qos in batch:
            self.received += 1
            try:
                kit_id, kind = wire.parse_topic(topic)
                if kind == "report":
                    report = wire.decode_report(payload, kit_id)
                    events += fleet.apply_report(report, now)
                elif payload:  # an empty retained payload only clears the topic
                    events += fleet.apply_status(kit_id, wire.decode_status(payload), now)
            except (wire.WireError, Refused) as exc:
                self.refused[exc.reason] += 1
                self._rlog.warning(exc.reason, "refused a message on %.120s: %s", topic, exc)
        return events

    def stop(self) -> None:
        self._stop.set()
        if self._worker:
            self._worker.join(10)
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
        records = self.fleet.take_dirty()
        seen = self.fleet.take_seen()
        if records or seen:
            self.store.write([], seen, records, self.clock())
