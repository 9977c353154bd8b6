"""ektp-agent: `run` the agent as a service, or `check` the kit once and print what is wrong."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor, wait

import msgspec

from agent import __version__, messages, wire
from agent.config import ConfigError, LoadedConfig, load

DEFAULT_CONFIG = os.environ.get(
    "EKTP_AGENT_CONFIG",
    r"C:\ProgramData\ektp-agent\agent.yaml" if sys.platform == "win32" else "/etc/ektp-agent/agent.yaml",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ektp-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ektp-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent: probe, queue and publish until stopped")
    check = sub.add_parser("check", help="run every probe once and say what is wrong")
    for p in (run, check):
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    check.add_argument("--lang", choices=messages.LANGS, default="id", help="language (default: id)")
    check.add_argument("--json", action="store_true", help="print JSON for machines")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log_level")
    return parser


def check(config: LoadedConfig, lang: str = "id", as_json: bool = False, out=sys.stdout, context=None) -> int:
    """Runs each probe once, concurrently, each within its timeout. Exit 0 only if none fails."""
    from agent import probes
    from agent.runner import run_safely
    from agent.service import probe_context

    context = context or probe_context(config)
    results: dict[str, wire.Entry] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, len(config.probes)), thread_name_prefix="check")
    futures = {}
    for spec in config.probes:
        try:
            probe = probes.create(spec, context)
        except Exception as exc:  # noqa: BLE001 - one bad probe must not hide the others
            entry_type = probes.REGISTRY[spec.type].entry_type
            results[spec.name] = entry_type(s="error", c="probe_failed", m=str(exc)[:256])
            continue
        futures[spec.name] = (probe, pool.submit(run_safely, probe))
    timeouts = {spec.name: spec.timeout for spec in config.probes}
    if futures:
        wait([f for _, f in futures.values()], timeout=max(timeouts[n] for n in futures))
    for name, (probe, future) in futures.items():
        results[name] = future.result() if future.done() else probe.failed("timeout", f"no result after {timeouts[name]:g} s")
    pool.shutdown(wait=False, cancel_futures=True)

    ordered = [(spec.name, results[spec.name]) for spec in config.probes]
    failing = [name for name, entry in ordered if entry.s in wire.FAILING_STATES]
    if as_json:
        doc = {
            "kit": str(config.raw.kit.kit_id()),
            "ok": not failing,
            "probes": {
                name: {
                    "state": entry.s,
                    "text": messages.describe(name, entry, lang),
                    **msgspec.to_builtins(entry),
                }
                for name, entry in ordered
            },
        }
        out.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    else:
        words = messages.STATE_WORDS[lang]
        width = max(len(w) for w in words.values()) + 2
        for name, entry in ordered:
            label = f"[{words[entry.s]}]".ljust(width + 1)
            text = messages.describe(name, entry, lang)
            out.write(f"{label} {messages.title(name, lang)}: {text}\n")
        warned = [name for name, entry in ordered if entry.s == "warn"]
        if failing:
            summary = {"id": f"{len(failing)} bermasalah: {', '.join(failing)}",
                       "en": f"{len(failing)} failing: {', '.join(failing)}"}[lang]
        elif warned:
            summary = {"id": f"Tidak ada yang gagal, tetapi perlu perhatian: {', '.join(warned)}",
                       "en": f"Nothing failing, but needs attention: {', '.join(warned)}"}[lang]
        else:
            summary = {"id": "Semua pemeriksaan lulus.", "en": "All checks passed."}[lang]
        out.write(summary + "\n")
    return 1 if failing else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"ektp-agent: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        logging.getLogger().setLevel(logging.ERROR)
        return check(config, lang=args.lang, as_json=args.json)
    logging.getLogger().setLevel((args.log_level or config.raw.log_level).upper())
    from agent.service import Agent

    agent = Agent(config)
    agent.install_signal_handlers()
    agent.run()
    return 0
