"""docs/configuration.md documents every key of both configs, and nothing that does not exist.

The keys come from the config schemas themselves (msgspec Structs): agent.config.AgentConfig with
its nested structs, the keys every probe takes (agent.config.ProbeSettings) as `probes.<name>.*`,
each probe type's Options (agent.probes.REGISTRY) as `probes.<type>.*`, and
collector.config.CollectorConfig. A mapping whose values are structs (kit names, link targets,
inventory) appears once with a placeholder such as `<kabupaten>`.

In the document, the key tables of the section for each config are what counts: the first cell of
a row is the key in backticks, and the third cell, the default, starts with the default as a YAML
literal in backticks (checked against the schema), `(required)`, or `none` where the schema's
default is None.

Also checked here: docs/deploy.md's troubleshooting table quotes every reason sentence of
agent/messages.py exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest
import yaml

from agent.config import AgentConfig, ProbeSettings
from agent.probes import REGISTRY
from collector.config import CollectorConfig
from conftest import ROOT

DOC = ROOT / "docs" / "configuration.md"
SECTIONS = {"agent": "## Agent configuration", "collector": "## Collector configuration"}
# Placeholder for the keys of a mapping, by the mapping's dotted path; `<name>` otherwise.
PLACEHOLDERS = {
    "inventory": "<kabupaten>",
    "inventory.<kabupaten>.kecamatan": "<kecamatan>",
    "probes.link.targets": "<target>",
}
REQUIRED = object()
UNKNOWN = object()  # a default that only the code computes (a factory without a plain value)


def _is_struct(t) -> bool:
    return isinstance(t, mi.StructType)


def _optional_struct(t):
    if isinstance(t, mi.UnionType):
        structs = [x for x in t.types if _is_struct(x)]
        if len(structs) == 1 and all(_is_struct(x) or isinstance(x, mi.NoneType) for x in t.types):
            return structs[0]
    return None


def _walk(struct: mi.StructType, prefix: str, parent_default, out: dict):
    for field in struct.fields:
        key = f"{prefix}{field.encode_name}"
        if field.required:
            default = getattr(parent_default, field.name) if parent_default is not None else REQUIRED
        elif field.default is not msgspec.NODEFAULT:
            default = field.default
        else:
            default = field.default_factory()
        t = field.type
        if _is_struct(t):  # a block of keys: its keys are listed, the block itself is not
            _walk(t, key + ".", default if default is not REQUIRED else None, out)
            continue
        out[key] = default
        if inner := _optional_struct(t):
            _walk(inner, key + ".", None, out)
        elif isinstance(t, mi.DictType) and _is_struct(t.value_type):
            _walk(t.value_type, f"{key}.{PLACEHOLDERS.get(key, '<name>')}.", None, out)


def schema_keys(struct_type: type, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    _walk(mi.type_info(struct_type), prefix, None, out)
    return out


def agent_keys() -> dict[str, object]:
    keys = schema_keys(AgentConfig)
    keys.update(schema_keys(ProbeSettings, "probes.<name>."))
    for type_name, probe in sorted(REGISTRY.items()):
        keys.update(schema_keys(probe.Options, f"probes.{type_name}."))
    return keys


def collector_keys() -> dict[str, object]:
    return schema_keys(CollectorConfig)


SCHEMAS = {"agent": agent_keys, "collector": collector_keys}


def documented(section: str) -> dict[str, str]:
    """key -> default cell, from the table rows of one section of the document."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(SECTIONS[section])
    end = min([i for other in SECTIONS.values() if (i := text.find(other, start + 1)) > 0] + [len(text)])
    rows: dict[str, str] = {}
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        match = re.fullmatch(r"`([^`]+)`", cells[0]) if cells else None
        if not match:
            continue
        assert len(cells) == 4, f"a key row has four cells (key, type, default, meaning): {line}"
        assert match.group(1) not in rows, f"{section}: {match.group(1)} documented twice"
        rows[match.group(1)] = cells[2]
    return rows


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_of_the_schema_is_documented(section):
    missing = sorted(set(SCHEMAS[section]()) - set(documented(section)))
    assert missing == [], f"docs/configuration.md ({section}) lacks: {missing}"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_documented_key_exists(section):
    stale = sorted(set(documented(section)) - set(SCHEMAS[section]()))
    assert stale == [], f"docs/configuration.md ({section}) documents keys the config does not have: {stale}"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_documented_defaults_match_the_schema(section):
    keys = SCHEMAS[section]()
    wrong = []
    for key, cell in documented(section).items():
        if key not in keys:
            continue
        default = keys[key]
        if default is REQUIRED:
            ok = cell.startswith("(required)")
        elif default is None:
            ok = cell.startswith("none")
        else:
            literal = re.match(r"`([^`]*)`", cell)
            value = msgspec.to_builtins(default)
            ok = bool(literal) and yaml.safe_load(literal.group(1)) == value
        if not ok:
            wrong.append(f"{key}: documented {cell!r}, schema default {msgspec.to_builtins(default)!r}"
                         if default not in (REQUIRED, None) else f"{key}: documented {cell!r}, schema: "
                         f"{'required' if default is REQUIRED else 'none'}")
    assert wrong == [], "\n".join(wrong)


def test_the_walk_sees_the_nested_and_per_type_keys():
    """Guards the test itself: if the walk stopped descending, the checks above would pass on little."""
    agent, collector = agent_keys(), collector_keys()
    for key in ("kit.kabupaten", "broker.tls.ca", "queue.max_size", "paths.sysfs", "probes.<name>.interval",
                "probes.host.clock_reference", "probes.link.targets.<target>.host", "probes.usb.ids",
                "probes.camera.v4l2", "probes.camera.ids", "probes.card_reader.reader_name", "probes.ups.baud"):
        assert key in agent, key
    for key in ("broker.session_expiry", "alerts.smtp", "alerts.smtp.host", "alerts.kit_down.hold",
                "alerts.link.target", "inventory.<kabupaten>.kecamatan.<kecamatan>.kits", "fleet.required_devices",
                "alerts.recipients.kabupaten"):
        assert key in collector, key
    assert agent["probes.<name>.enabled"] is True and collector["alerts.kit_down.hold"] == 300
    assert len(agent) > 50 and len(collector) > 50


def test_troubleshooting_quotes_the_agents_own_words():
    """docs/deploy.md explains every reason code `ektp-agent check` can print, in its exact words
    (agent/messages.py), so the operator can find the line on the screen in the table."""
    from agent import messages

    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    start = text.index("### What `ektp-agent check` says")
    section = text[start:text.index("\n### ", start + 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and (match := re.fullmatch(r"`([a-z_]+)`", cells[0])):
            assert len(cells) == 4 and cells[3], f"code, Indonesian, English, what to do: {line}"
            rows[match.group(1)] = cells[1:3]
    assert sorted(set(messages.REASONS) - set(rows)) == [], "reason codes without a troubleshooting row"
    assert sorted(set(rows) - set(messages.REASONS)) == [], "rows for codes the agent does not send"
    for code, cells in rows.items():
        for lang, cell in zip(("id", "en"), cells):
            words = messages.REASONS[code][lang].format(title=messages.title("fingerprint", lang), m="…")
            assert cell == words, f"{code} ({lang}): the document says {cell!r}, the agent says {words!r}"
