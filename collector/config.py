"""Collector configuration: YAML into typed objects, errors naming file, key and expectation."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from agent import wire
from agent.config import (
    Broker,
    ConfigError,
    Secret,
    TlsConfig,
    _check_readable,
    check_broker,
    convert,
    read_secret,
    read_yaml,
)

Slug = Annotated[str, Meta(pattern=wire.SLUG_PATTERN)]
DEVICE_NAMES = ("fingerprint", "iris", "camera", "signature_pad", "card_reader", "ups")


class BrokerConfig(Struct, forbid_unknown_fields=True):
    url: str
    username: str | None = None
    password_file: str | None = None
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    # Fixed, so the broker keeps this collector's session (and queues QoS 1 reports) across restarts.
    client_id: str = "ektp-collector"
    session_expiry: Annotated[int, Meta(ge=0, le=30 * 86400)] = 7 * 86400
    # Subscribe to these kabupaten only (one collector per region); empty: the whole fleet.
    kabupaten: list[Slug] = []
    keepalive: Annotated[int, Meta(ge=5, le=3600)] = 30
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 1000


class HttpConfig(Struct, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:9847"
    # Prometheus exporter-toolkit style: tls_server_config and basic_auth_users (bcrypt hashes).
    web_config: str | None = None


class StoreConfig(Struct, forbid_unknown_fields=True):
    path: str | None = None
    history_days: Annotated[int, Meta(ge=1, le=3650)] = 400


class FleetConfig(Struct, forbid_unknown_fields=True):
    required_devices: list[Literal[DEVICE_NAMES]] = msgspec.field(
        default_factory=lambda: ["fingerprint", "iris", "camera", "signature_pad"]
    )
    offline_after_heartbeats: Annotated[float, Meta(ge=1.5, le=100)] = 3.0
    unknown_kits: Literal["accept", "refuse"] = "accept"
    max_kits: Annotated[int, Meta(ge=1, le=1_000_000)] = 20_000
    # Reports stamped further than this from the collector's clock are refused (seconds). The
    # past bound is long because a kit may replay months of backlog after an outage.
    max_report_age: Annotated[int, Meta(ge=60)] = 400 * 86400
    max_report_future: Annotated[int, Meta(ge=60)] = 2 * 86400


class KecamatanConfig(Struct, forbid_unknown_fields=True):
    kits: Annotated[list[Slug], Meta(min_length=1)]
    name: str | None = None
    lat: Annotated[float, Meta(ge=-90, le=90)] | None = None
    lon: Annotated[float, Meta(ge=-180, le=180)] | None = None


class KabupatenConfig(Struct, forbid_unknown_fields=True):
    kecamatan: dict[Slug, KecamatanConfig]
    name: str | None = None


Seconds = Annotated[int, Meta(ge=0, le=30 * 86400)]


class SmtpConfig(Struct, forbid_unknown_fields=True):
    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None  # default: 587, 465 for tls, 25 for none
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password_file: str | None = None
    ca: str | None = None  # CA bundle for the server's certificate; default: system store
    timeout: Annotated[float, Meta(gt=0, le=300)] = 30.0
    from_address: str = "ektp-monitor@localhost"


class HoldConfig(Struct, forbid_unknown_fields=True):
    hold: Seconds  # the condition must last this long before an email goes out
    recover: Seconds  # and must be gone this long before "recovered" is sent


def _hold(hold: int, recover: int):
    return msgspec.field(default_factory=lambda: HoldConfig(hold, recover))


class LinkAlertConfig(HoldConfig, forbid_unknown_fields=True):
    target: Slug = "district"  # the link probe target whose silence is alerted


class StaleConfig(Struct, forbid_unknown_fields=True):
    hold: Seconds = 3600  # after the collector starts, before a silent expected kit is reported
    repeat: Annotated[int, Meta(ge=3600)] = 86400


class RecipientsConfig(Struct, forbid_unknown_fields=True):
    everywhere: list[str] = []  # receive every kabupaten's alerts
    kabupaten: dict[Slug, list[str]] = {}


class AlertsConfig(Struct, forbid_unknown_fields=True):
    smtp: SmtpConfig | None = None  # no smtp: alerts are evaluated and kept, nothing is sent
    language: Literal["id", "en"] = "id"
    timezone: str = "Asia/Jakarta"
    recipients: RecipientsConfig = msgspec.field(default_factory=RecipientsConfig)
    test_address: str | None = None  # dry run: every email goes here instead
    kit_down: HoldConfig = _hold(300, 300)
    power: HoldConfig = _hold(60, 120)
    link: LinkAlertConfig = msgspec.field(default_factory=lambda: LinkAlertConfig(300, 120))
    stale: StaleConfig = msgspec.field(default_factory=StaleConfig)
    reminder_every: Annotated[int, Meta(ge=3600)] = 86400
    digest_window: Annotated[int, Meta(ge=0, le=3600)] = 120
    evaluate_every: Annotated[float, Meta(gt=0, le=300)] = 5.0
    templates_dir: str | None = None


class CollectorConfig(Struct, forbid_unknown_fields=True):
    broker: BrokerConfig
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    fleet: FleetConfig = msgspec.field(default_factory=FleetConfig)
    inventory: dict[Slug, KabupatenConfig] = {}
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class WebConfig(Struct, forbid_unknown_fields=False):
    """The subset of the Prometheus exporter web config this collector honours."""

    tls_server_config: dict[str, str] = {}
    basic_auth_users: dict[str, str] = {}


class LoadedCollectorConfig(Struct):
    path: str
    raw: CollectorConfig
    broker: Broker
    password: Secret | None
    listen_host: str
    listen_port: int
    store_path: Path
    tls_cert: str | None
    tls_key: str | None
    tls_client_ca: str | None
    basic_auth: dict[str, bytes]
    smtp_password: Secret | None = None


def default_store_path() -> Path:
    if sys.platform == "win32":
        base = Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "ektp-collector"
    else:
        base = Path(os.environ.get("STATE_DIRECTORY", "/var/lib/ektp-collector"))
    return base / "collector.sqlite"


def _listen(value: str, file: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(file, "http.listen", "expected host:port, e.g. 127.0.0.1:9847 or 0.0.0.0:9847")
    return host.strip("[]") or "0.0.0.0", int(port)


def _web_config(path: str, file: str) -> tuple[str | None, str | None, str | None, dict[str, bytes]]:
    data = read_yaml(path)
    web = convert(data, WebConfig, path)
    tls = web.tls_server_config
    unknown = set(tls) - {"cert_file", "key_file", "client_ca_file"}
    if unknown:
        raise ConfigError(path, f"tls_server_config.{sorted(unknown)[0]}", "not supported here")
    if bool(tls.get("cert_file")) != bool(tls.get("key_file")):
        raise ConfigError(path, "tls_server_config", "set both cert_file and key_file")
    base = Path(path).parent
    resolved = {k: str(base / v) for k, v in tls.items()}
    for key, value in resolved.items():
        _check_readable(value, path, f"tls_server_config.{key}")
    users = {}
    for user, hashed in web.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(path, f"basic_auth_users.{user}", "expected a bcrypt hash (htpasswd -nBC 10 user)")
        users[user] = hashed.encode()
    return resolved.get("cert_file"), resolved.get("key_file"), resolved.get("client_ca_file"), users


def load(path: str | os.PathLike) -> LoadedCollectorConfig:
    file = str(path)
    raw: CollectorConfig = convert(read_yaml(path), CollectorConfig, file)
    broker, password = check_broker(raw.broker, file)
    host, port = _listen(raw.http.listen, file)
    cert = key = client_ca = None
    users: dict[str, bytes] = {}
    if raw.http.web_config:
        _check_readable(raw.http.web_config, file, "http.web_config")
        cert, key, client_ca, users = _web_config(raw.http.web_config, file)
    store = Path(raw.store.path) if raw.store.path else default_store_path()
    smtp_password = _check_alerts(raw.alerts, file)
    kits = sum(len(kec.kits) for kab in raw.inventory.values() for kec in kab.kecamatan.values())
    if kits > raw.fleet.max_kits:
        raise ConfigError(file, "fleet.max_kits", f"the inventory lists {kits} kits, more than max_kits")
    return LoadedCollectorConfig(file, raw, broker, password, host, port, store, cert, key, client_ca, users,
                                 smtp_password)


def _check_alerts(alerts: AlertsConfig, file: str) -> Secret | None:
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(alerts.timezone)
    except Exception:  # noqa: BLE001 - ZoneInfo raises several kinds
        raise ConfigError(file, "alerts.timezone", f"unknown time zone {alerts.timezone!r}; e.g. Asia/Jakarta, "
                          "Asia/Makassar, Asia/Jayapura") from None
    addresses = [("alerts.test_address", alerts.test_address)] if alerts.test_address else []
    addresses += [(f"alerts.recipients.everywhere[{i}]", a) for i, a in enumerate(alerts.recipients.everywhere)]
    for kab, items in alerts.recipients.kabupaten.items():
        addresses += [(f"alerts.recipients.kabupaten.{kab}[{i}]", a) for i, a in enumerate(items)]
    for key, address in addresses:
        if "@" not in address or any(c in address for c in " \r\n,;<>"):
            raise ConfigError(file, key, f"{address!r} is not an email address")
    if alerts.templates_dir:
        _check_readable(alerts.templates_dir, file, "alerts.templates_dir")
    smtp = alerts.smtp
    if smtp is None:
        return None
    _check_readable(smtp.ca, file, "alerts.smtp.ca")
    if smtp.password_file:
        if not smtp.username:
            raise ConfigError(file, "alerts.smtp.username", "required when alerts.smtp.password_file is set")
        return read_secret(smtp.password_file, file, "alerts.smtp.password_file")
    return None
