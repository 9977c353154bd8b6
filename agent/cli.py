"""ektp-agent: `run` the agent as a service, or `check` the kit once and print what is wrong."""

from __future__ import annotations

import argparse
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
    others = other_usb_devices(config, context)
    if as_json:
        import json  # only here: `run` never needs it

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
            "other_usb_devices": others,
        }
        out.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    else:
        words = messages.STATE_WORDS[lang]
        width = max(len(w) for w in words.values()) + 2
        for name, entry in ordered:
            label = f"[{words[entry.s]}]".ljust(width + 1)
            title = messages.title(name, lang)
            text = messages.describe(name, entry, lang)
            # "Pemindai iris tidak terdeteksi" already names the device
            line = text if text.lower().startswith(title.lower()) else f"{title}: {text}".rstrip(": ")
            out.write(f"{label} {line}\n")
        if others:
            out.write({"id": "Perangkat USB lain yang terpasang (tidak ada di konfigurasi):\n",
                       "en": "Other USB devices plugged in (not in the config):\n"}[lang])
            for item in others:
                unknown = {"id": "tidak dikenal", "en": "unknown"}[lang]
                out.write(f"  {item['id']}  {item['name'] or unknown}  (port {item['bus']})\n")
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


def other_usb_devices(config: LoadedConfig, context) -> list[dict]:
    """USB devices present that no probe watches, named from the catalogue or usb.ids, so a
    technician can find the ids of a kit's devices. Only when USB probes are configured."""
    from agent.catalogue import UsbNamer, describe_usb, load_catalogue
    from agent.probes.usb import UsbListError, UsbOptions, list_usb_devices, resolve_platform

    usb_specs = [spec for spec in config.probes if isinstance(spec.options, UsbOptions)]
    if not usb_specs:
        return []
    configured = {i.lower() for spec in usb_specs for i in spec.options.ids}
    try:
        platform = resolve_platform(usb_specs[0].options.platform, context.platform)
        devices = list_usb_devices(platform, context.sysfs_root)
        catalogue = load_catalogue()
    except (UsbListError, OSError, ValueError):
        return []
    namer = UsbNamer()
    return [
        {"id": device.usb_id, "name": describe_usb(device.vid, device.pid, catalogue, namer), "bus": device.bus}
        for device in devices
        if device.usb_id not in configured and device.vid != "1d6b"  # 1d6b: the kernel's root hubs
    ]


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
