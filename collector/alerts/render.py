"""Turns queued notifications into an email (subject, plain text, HTML) through editable templates.

Templates are Jinja2 files under collector/alerts/templates/<lang>/; a district may copy them to
`alerts.templates_dir` and change the wording. They run in Jinja2's sandbox, autoescaped for HTML.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from agent import messages

PACKAGE_TEMPLATES = Path(__file__).parent / "templates"

ZONE_NAMES = {"Asia/Jakarta": "WIB", "Asia/Pontianak": "WIB", "Asia/Makassar": "WITA", "Asia/Jayapura": "WIT"}
UNITS = {
    "id": (("hari", 86400), ("jam", 3600), ("menit", 60)),
    "en": (("days", 86400), ("hours", 3600), ("minutes", 60)),
}


def duration(seconds: float, lang: str) -> str:
    seconds = max(0, int(seconds))
    parts = []
    for name, size in UNITS[lang]:
        count, seconds = divmod(seconds, size)
        if count:
            if lang == "en" and count == 1:
                name = name[:-1]
            parts.append(f"{count} {name}")
    return " ".join(parts[:2]) or ("kurang dari 1 menit" if lang == "id" else "under a minute")


def device_problems(note: dict, lang: str) -> list[str]:
    """Plain sentences for what keeps the kit from recording, e.g. 'pemindai iris tidak terdeteksi'."""
    facts = note.get("facts") or {}
    if facts.get("offline"):
        return ["kit tidak aktif (offline)" if lang == "id" else "kit offline"]
    out = []
    for device in facts.get("devices", []):
        if device["code"] == "not_reported":
            text = f"{messages.title(device['name'], lang)} " + ("tidak dilaporkan" if lang == "id" else "not reported")
        elif device["code"]:
            text = messages.reason(device["name"], device["code"], device.get("detail", ""), lang)
            if not text.lower().startswith(messages.title(device["name"], lang).lower()):
                text = f"{messages.title(device['name'], lang)}: {text}"
        else:
            state = messages.STATE_WORDS[lang].get(device["state"], device["state"]).lower()
            text = f"{messages.title(device['name'], lang)} {state}"
        out.append(text[:1].lower() + text[1:])
    return out


class Renderer:
    def __init__(self, lang: str = "id", timezone: str = "Asia/Jakarta", templates_dir: str | None = None):
        self.lang = lang
        self.zone = ZoneInfo(timezone)
        self.zone_name = ZONE_NAMES.get(timezone, timezone)
        loaders = [FileSystemLoader(str(Path(templates_dir) / lang))] if templates_dir else []
        loaders.append(FileSystemLoader(str(PACKAGE_TEMPLATES / lang)))
        self.env = SandboxedEnvironment(
            loader=ChoiceLoader(loaders),
            autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.env.filters["time"] = self.local_time
        self.env.filters["duration"] = lambda s: duration(s, lang)
        self.env.globals["problems"] = lambda note: device_problems(note, lang)
        self.env.globals["title"] = lambda name: messages.title(name, lang)

    def local_time(self, timestamp: float | None) -> str:
        if timestamp is None:
            return "-"
        moment = dt.datetime.fromtimestamp(timestamp, self.zone)
        return moment.strftime("%d-%m-%Y %H:%M ") + self.zone_name

    def render(self, notes: list[dict]) -> tuple[str, str, str]:
        """(subject, text, html) for one notification, or a digest of several."""
        contexts = [n["context"] for n in notes]
        if len(contexts) == 1:
            values = {"n": contexts[0]}
            names = ("subject.txt", "body.txt", "body.html")
        else:
            values = {"notes": contexts, "count": len(contexts)}
            names = ("digest_subject.txt", "digest_body.txt", "digest_body.html")
        subject, text, html = (self.env.get_template(name).render(**values) for name in names)
        return " ".join(subject.split())[:200], text, html
