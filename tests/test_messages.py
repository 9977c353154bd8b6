"""Every reason a probe can send has words in both languages."""

import re
from pathlib import Path

import pytest

from agent import messages, wire
from agent.probes import REGISTRY
from agent.probes.base import Probe

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("probe_cls", sorted(REGISTRY.values(), key=lambda c: c.type_name), ids=lambda c: c.type_name)
def test_every_declared_code_has_words(probe_cls):
    for code in probe_cls.codes + Probe.RUNNER_CODES:
        for lang in messages.LANGS:
            assert messages.REASONS[code][lang], (code, lang)


def test_codes_in_probe_sources_are_declared():
    """A code written in a probe's source but not declared would reach people as a bare token."""
    declared = {code for cls in REGISTRY.values() for code in cls.codes} | set(Probe.RUNNER_CODES)
    for path in (ROOT / "agent" / "probes").glob("*.py"):
        text = path.read_text()
        used = set(re.findall(r'\bc="([a-z_]+)"', text)) | set(re.findall(r'(?m)^\s+code = "([a-z_]+)"', text))
        used |= set(re.findall(r'codes\.append\("([a-z_]+)"\)', text))
        used |= set(re.findall(r'"(?:error|warn|missing)", "([a-z_]+)"', text))
        assert used <= declared, f"{path.name}: {sorted(used - declared)} not declared in `codes`"


def test_reason_sentences():
    assert messages.reason("iris", "not_detected", "", "id") == "Pemindai iris tidak terdeteksi"
    assert messages.reason("iris", "not_detected", "", "en") == "Iris scanner not detected"
    assert messages.reason("link", "", "", "id") == ""
    assert messages.reason("x", "brand_new_code", "detail", "id") == "brand_new_code: detail"


def test_every_state_has_words():
    for lang in messages.LANGS:
        assert set(messages.STATE_WORDS[lang]) == set(wire.STATES)
