"""ektp-collector: district-side tools. `tail` prints the kits' messages as they arrive."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import wire
from collector import __version__


DEFAULT_CONFIG = os.environ.get(
    "EKTP_COLLECTOR_CONFIG",
    r"C:\ProgramData\ektp-collector\collector.yaml" if sys.platform == "win32" else "/etc/ektp-collector/collector.yaml",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ektp-collector", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ektp-collector {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="ingest kit reports, keep fleet state and history, serve metrics")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log_level")
    tail = sub.add_parser("tail", help="print decoded status and report messages (one JSON line each)")
    tail.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    tail.add_argument("--ca", help="CA file for mqtts:// (default: system store)")
    tail.add_argument("--kabupaten", help="only this kabupaten")
    tail.add_argument("--count", type=int, default=0, help="stop after this many messages")
    sub.add_parser("demo", help="a private broker and a few real agents, messages printed live (DEMO_SECONDS=N stops)")
    return parser


def tail(args, out=sys.stdout) -> int:
    parts = urlsplit(args.broker)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        print("ektp-collector: --broker: expected mqtt://host:port or mqtts://host:port", file=sys.stderr)
        return 2
    done = threading.Event()
    seen = 0
    lock = threading.Lock()

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(wire.subscription(args.kabupaten), qos=1)

    def on_message(client, userdata, msg):
        nonlocal seen
        try:
            kit, kind = wire.parse_topic(msg.topic)
            message = wire.decode_status(msg.payload) if kind == "status" else wire.decode_report(msg.payload, kit)
            line = {"topic": msg.topic, "retained": bool(msg.retain), kind: msgspec.to_builtins(message)}
        except wire.WireError as exc:
            line = {"topic": msg.topic, "refused": exc.reason, "detail": exc.detail}
        with lock:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            seen += 1
            if args.count and seen >= args.count:
                done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    if parts.scheme == "mqtts":
        client.tls_set(ca_certs=args.ca)
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883))
    client.loop_start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    client.disconnect()
    client.loop_stop()
    return 0


def run(args) -> int:
    from agent.config import ConfigError
    from collector.config import load
    from collector.service import Collector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"ektp-collector: config error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel((args.log_level or config.raw.log_level).upper())
    collector = Collector(config)
    collector.install_signal_handlers()
    collector.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "tail":
        return tail(args)
    if args.command == "demo":
        from collector import demo

        return demo.main()
    return 2
