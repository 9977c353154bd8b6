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
    tail.add_argument("--username", help="broker user name")
    tail.add_argument("--password-file", help="file holding the broker password")
    tail.add_argument("--kabupaten", help="only this kabupaten")
    tail.add_argument("--count", type=int, default=0, help="stop after this many messages")
    test_email = sub.add_parser("test-email", help="send a sample alert email to check the SMTP settings")
    test_email.add_argument("--to", required=True, help="the address to send the sample to")
    test_email.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
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
    if args.username:
        password = None
        if args.password_file:
            with open(args.password_file, encoding="utf-8") as fh:
                password = fh.read().strip("\r\n")
        client.username_pw_set(args.username, password)
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


def test_email(args) -> int:
    """Renders a sample 'kit down' alert with the configured templates and sends it now."""
    import smtplib
    import time

    from agent.config import ConfigError
    from collector.alerts.mailer import build_message, send
    from collector.alerts.render import Renderer
    from collector.config import load

    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"ektp-collector: config error: {exc}", file=sys.stderr)
        return 2
    alerts = config.raw.alerts
    if alerts.smtp is None:
        print(f"ektp-collector: {args.config}: alerts.smtp is not set; nothing can be sent", file=sys.stderr)
        return 2
    kab, kab_cfg = next(iter(config.raw.inventory.items()), ("contoh", None))
    kec, kec_cfg = next(iter(kab_cfg.kecamatan.items())) if kab_cfg else ("contoh", None)
    now = time.time()
    context = {
        "kind": "firing", "condition": "kit_down", "severity": "critical", "subject": "",
        "kabupaten": kab, "kecamatan": kec, "kit": kec_cfg.kits[0] if kec_cfg else "kit-1",
        "kabupaten_name": (kab_cfg.name if kab_cfg else None) or kab.title(),
        "kecamatan_name": (kec_cfg.name if kec_cfg else None) or kec.replace("-", " ").title(),
        "since": now - 600, "now": now, "online": True, "last_report": now - 30,
        "facts": {"offline": False, "devices": [{"name": "iris", "state": "missing", "code": "not_detected",
                                                 "detail": ""}]},
        "ups": {"on_battery": False, "battery_low": False, "charge": 1.0}, "links": {"district": True},
        "nearest_ready": None,
    }
    renderer = Renderer(alerts.language, alerts.timezone, alerts.templates_dir)
    subject, text, html = renderer.render([{"context": context}])
    note = {"id": "[UJI / TEST] Ini email uji dari ektp-collector; tidak ada kit yang rusak.\n\n",
            "en": "[TEST] This is a test email from ektp-collector; no kit is broken.\n\n"}[alerts.language]
    message = build_message(alerts.smtp.from_address, args.to, "[UJI/TEST] " + subject, note + text, html)
    try:
        send(alerts.smtp, config.smtp_password, message)
    except (smtplib.SMTPException, OSError) as exc:
        print(f"ektp-collector: sending to {args.to} through {alerts.smtp.host} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    print(f"sent a test email to {args.to} through {alerts.smtp.host}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "test-email":
        return test_email(args)
    if args.command == "tail":
        return tail(args)
    if args.command == "demo":
        from collector import demo

        return demo.main()
    return 2
