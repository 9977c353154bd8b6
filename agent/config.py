"""Agent configuration: YAML loaded into typed objects.

Every error names the file, the key and what was expected, so an operator can fix it without
reading code. Probe options are checked by each probe's own Options struct (agent/probes/).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml
from msgspec import Meta, Struct

from agent import wire

log = logging.getLogger("ektp.agent.config")


class ConfigError(Exception):
    def __init__(self, file: str | os.PathLike, key: str, message: str):
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


PositiveSeconds = Annotated[float, Meta(gt=0, le=86400)]
Slug = Annotated[str, Meta(pattern=wire.SLUG_PATTERN)]


class KitIdentity(Struct, forbid_unknown_fields=True):
    kabupaten: Slug
    kecamatan: Slug
    id: Slug

    def kit_id(self) -> wire.KitId:
        return wire.KitId(self.kabupaten, self.kecamatan, self.id)


class TlsConfig(Struct, forbid_unknown_fields=True):
    ca: str | None = None  # CA bundle that signs the broker's certificate; None: system store
    cert: str | None = None  # client certificate (PEM) for brokers that require one
    key: str | None = None  # its private key (PEM)


class BrokerConfig(Struct, forbid_unknown_fields=True):
    url: str
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password_file: str | None = None
    # 120, not 60: paho-mqtt 2.2 pings every keepalive even while reports flow (docs/wire-protocol.md)
    keepalive: Annotated[int, Meta(ge=5, le=3600)] = 120
    will_delay: Annotated[int, Meta(ge=0, le=3600)] = 30
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    client_id: str | None = None
    compress: bool = True
    max_inflight: Annotated[int, Meta(ge=1, le=1000)] = 20
    reconnect_max_delay: Annotated[int, Meta(ge=1, le=3600)] = 120  # seconds; backoff doubles up to this


class QueueConfig(Struct, forbid_unknown_fields=True):
    max_size: int | str = "50MB"


class SystemPaths(Struct, forbid_unknown_fields=True):
    """Where probes read the system; tests and the demo point these at fixture trees."""

    sysfs: str = "/sys"
    dev: str = "/dev"


class AgentConfig(Struct, forbid_unknown_fields=True):
    kit: KitIdentity
    broker: BrokerConfig
    heartbeat: Annotated[int, Meta(ge=1, le=86400)] = 60
    # seconds after which a device's identity is sent in full again (0: in every report)
    identity_refresh: Annotated[int, Meta(ge=0, le=86400)] = 900
    state_dir: str | None = None
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    probes: dict[str, dict[str, Any]] = {}
    paths: SystemPaths = msgspec.field(default_factory=SystemPaths)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class ProbeSettings(Struct, forbid_unknown_fields=False):
    """Keys every probe accepts; the rest belong to the probe's own Options."""

    type: str | None = None
    interval: PositiveSeconds | None = None
    timeout: PositiveSeconds | None = None
    enabled: bool = True


COMMON_PROBE_KEYS = ("type", "interval", "timeout", "enabled")


class Secret:
    """A password that never shows in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


class Broker(Struct):
    """The broker address taken apart, ready for the MQTT client."""

    host: str
    port: int
    tls: bool


class LoadedConfig(Struct):
    """What the rest of the agent uses: the parsed file plus values derived from it."""

    path: str
    raw: AgentConfig
    broker: Broker
    password: Secret | None
    state_dir: Path
    queue_max_bytes: int
    probes: list["ProbeSpec"]


class ProbeSpec(Struct):
    name: str
    type: str
    interval: float
    timeout: float
    options: Any  # the probe's Options instance


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(value)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def default_state_dir() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "ektp-agent"
    return Path(os.environ.get("STATE_DIRECTORY", "/var/lib/ektp-agent"))


_EXPECT_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "str": "text",
    "bool": "true or false",
    "object": "a mapping of keys",
    "array": "a list",
    "null": "nothing",
}


def _words(kind: str) -> str:
    parts = [p.strip(" `") for p in kind.split("|")]
    return " or ".join(_EXPECT_WORDS.get(p, p) for p in parts)


def _explain(exc: msgspec.ValidationError, prefix: str) -> tuple[str, str]:
    """Turn msgspec's message into (dotted key, plain words)."""
    text = str(exc)
    path = ""
    match = re.search(r" - at `\$(.*)`$", text)
    if match:
        path = match.group(1)
        text = text[: match.start()]
    elif match := re.search(r" - at `key` in `\$(.*)`$", text):  # a mapping's key is wrong
        path = match.group(1)
        text = text[: match.start()] + " (in a key name)"
    key = (prefix + path).lstrip(".").replace(".[", "[")
    join = (lambda name: f"{key}.{name}" if key else name)
    if m := re.match(r"Object missing required field `(.+)`", text):
        return join(m.group(1)), "required key is missing"
    if m := re.match(r"Object contains unknown field `(.+)`", text):
        return join(m.group(1)), "unknown key (check the spelling; see config/agent.example.yaml)"
    if m := re.match(r"Expected `(.+?)`, got `(.+)`", text):
        return key, f"expected {_words(m.group(1))}, got {_words(m.group(2))}"
    if "matching regex" in text and wire.SLUG_PATTERN in text:
        what = "key names use" if text.endswith("(in a key name)") else "expected"
        return key, f"{what} lower-case letters, digits, '-' or '_' (at most 48, starting with a letter or digit)"
    if m := re.match(r"Expected `str` matching regex '(.+)'", text):
        return key, f"expected text of the form {m.group(1)}"
    if m := re.match(r"Expected `(.+?)` (>=|<=|>|<) (.+)", text):
        return key, f"expected {_words(m.group(1))} {m.group(2)} {m.group(3)}"
    if m := re.match(r"Invalid enum value (.+)", text):
        return key, f"value {m.group(1)} is not one of the allowed values"
    return key, text


def _name_dict_keys(data: Any, type_: type, text: str) -> str:
    """msgspec writes `[...]` for a key of a mapping; find which key it was by retrying."""
    match = re.search(r" - at (?:`key` in )?`\$(.*)`$", text)
    if not match or "[...]" not in match.group(1):
        return text
    path = match.group(1)
    head, _, tail = path.partition("[...]")
    parent = data
    for part in [p for p in head.split(".") if p]:
        if not isinstance(parent, dict) or part not in parent:
            return text
        parent = parent[part]
    if not isinstance(parent, dict):
        return text
    original = dict(parent)
    try:
        for key, value in original.items():
            parent.clear()
            parent[key] = value
            try:
                msgspec.convert(data, type_, strict=True)
            except msgspec.ValidationError as exc:
                if str(exc) == text:
                    return _name_dict_keys(data, type_, text.replace("[...]", f".{key}", 1))
    finally:
        parent.clear()
        parent.update(original)
    return text


def convert(data: Any, type_: type, file: str, prefix: str = ""):
    try:
        return msgspec.convert(data, type_, strict=True)
    except msgspec.ValidationError as exc:
        text = _name_dict_keys(data, type_, str(exc))
        key, message = _explain(msgspec.ValidationError(text), prefix)
        raise ConfigError(file, key, message) from None


class _NoAliasLoader(yaml.SafeLoader):
    """Refuses YAML aliases: a few lines of them can expand into billions of nodes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in this file",
                                              event.start_mark)
        return super().compose_node(parent, index)


MAX_CONFIG_BYTES = 1024 * 1024


def read_yaml(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(path, "", f"the file is larger than {MAX_CONFIG_BYTES // 1024} KB")
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "the file is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, "", f"{where}not valid YAML ({problem})") from None
    if data is None:
        raise ConfigError(path, "", "the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(path, "", "expected a mapping of keys at the top level")
    return data


def parse_broker_url(url: str, file: str) -> Broker:
    parts = urlsplit(url)
    defaults = {"mqtt": 1883, "mqtts": 8883}
    if parts.scheme not in defaults:
        raise ConfigError(file, "broker.url", "expected mqtts://host:port (TLS) or mqtt://host:port")
    if not parts.hostname:
        raise ConfigError(file, "broker.url", "the URL has no host name")
    if parts.username or parts.password:
        raise ConfigError(file, "broker.url", "put credentials in broker.username and broker.password_file, not the URL")
    try:
        port = parts.port or defaults[parts.scheme]
    except ValueError:
        raise ConfigError(file, "broker.url", "the port must be a number from 1 to 65535") from None
    return Broker(parts.hostname, port, parts.scheme == "mqtts")


def read_secret(path: str, file: str, key: str) -> Secret:
    try:
        with open(path, encoding="utf-8") as fh:
            secret = fh.read().strip("\r\n")
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(file, key, f"cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(file, key, f"{path} is empty")
    if sys.platform != "win32" and mode & stat.S_IROTH:
        log.warning("%s: %s: %s is readable by other users; run: chmod 600 %s", file, key, path, path)
    return Secret(secret)


def _check_readable(path: str | None, file: str, key: str) -> None:
    if path is None:
        return
    if not os.access(path, os.R_OK):
        reason = "does not exist" if not os.path.exists(path) else "is not readable by this user"
        raise ConfigError(file, key, f"{path} {reason}")


def check_broker(settings, file: str) -> tuple[Broker, Secret | None]:
    """The `broker:` block shared by the agent's and the collector's configs: URL, TLS files,
    credentials. Returns the parsed address and the password read from its file."""
    broker = parse_broker_url(settings.url, file)
    tls = settings.tls
    if not broker.tls and (tls.ca or tls.cert or tls.key):
        raise ConfigError(file, "broker.tls", "TLS files are set but broker.url is not mqtts://")
    for key in ("ca", "cert", "key"):
        _check_readable(getattr(tls, key), file, f"broker.tls.{key}")
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError(file, "broker.tls", "set both cert and key, or neither")
    password = None
    if settings.password_file:
        if not settings.username:
            raise ConfigError(file, "broker.username", "required when broker.password_file is set")
        password = read_secret(settings.password_file, file, "broker.password_file")
    return broker, password


def load(path: str | os.PathLike, registry: dict[str, type] | None = None) -> LoadedConfig:
    """Read and check the agent config. `registry` maps probe type names to probe classes."""
    from agent.probes import REGISTRY, default_type

    registry = REGISTRY if registry is None else registry
    file = str(path)
    raw: AgentConfig = convert(read_yaml(path), AgentConfig, file)
    broker, password = check_broker(raw.broker, file)
    try:
        max_bytes = parse_size(raw.queue.max_size)
    except ValueError:
        raise ConfigError(file, "queue.max_size", "expected a size such as 50MB, 500KB or a number of bytes") from None
    if not 1024 <= max_bytes <= 64 * 1024**3:
        raise ConfigError(file, "queue.max_size", "expected a size from 1KB to 64GB")
    state_dir = Path(raw.state_dir) if raw.state_dir else default_state_dir()
    if not raw.probes:
        raise ConfigError(file, "probes", "no probes configured; see config/agent.example.yaml")
    specs = []
    for name, body in raw.probes.items():
        specs.extend(_probe_spec(name, body, raw.heartbeat, registry, default_type, file))
    return LoadedConfig(file, raw, broker, password, state_dir, max_bytes, specs)


def _probe_spec(name, body, heartbeat, registry, default_type, file) -> list[ProbeSpec]:
    key = f"probes.{name}"
    if not wire.is_slug(str(name)):
        raise ConfigError(file, key, "probe names use lower-case letters, digits, '-' or '_'")
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise ConfigError(file, key, "expected a mapping of keys")
    common: ProbeSettings = convert(body, ProbeSettings, file, "." + key)
    if not common.enabled:
        return []
    type_name = common.type or default_type(name)
    if type_name not in registry:
        known = ", ".join(sorted(registry))
        raise ConfigError(file, f"{key}.type", f"unknown probe type {type_name!r}; known types: {known}")
    probe_cls = registry[type_name]
    rest = {k: v for k, v in body.items() if k not in COMMON_PROBE_KEYS}
    options = convert(rest, probe_cls.Options, file, "." + key)
    interval = common.interval or float(heartbeat)
    timeout = common.timeout or min(10.0, interval)
    if timeout > interval:
        raise ConfigError(file, f"{key}.timeout", f"expected at most the interval ({interval:g} s)")
    return [ProbeSpec(name, type_name, interval, timeout, options)]
