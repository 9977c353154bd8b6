"""Words for people: probe titles, states and reason codes, in Bahasa Indonesia and English.

Probes send stable reason codes (wire field `c`) and details (`m`); this table turns them into
sentences. Add a code here when a probe starts sending it (tests/test_messages.py checks).
"""

from __future__ import annotations

LANGS = ("id", "en")

STATE_WORDS = {
    "id": {"ok": "OK", "warn": "PERHATIAN", "missing": "TIDAK ADA", "error": "GAGAL"},
    "en": {"ok": "OK", "warn": "WARNING", "missing": "MISSING", "error": "FAILED"},
}

TITLES = {
    "host": {"id": "Komputer (PC)", "en": "Computer (PC)"},
    "link": {"id": "Jaringan", "en": "Network link"},
    "fingerprint": {"id": "Pemindai sidik jari", "en": "Fingerprint scanner"},
    "iris": {"id": "Pemindai iris", "en": "Iris scanner"},
    "camera": {"id": "Kamera", "en": "Camera"},
    "signature_pad": {"id": "Alat tanda tangan (signature pad)", "en": "Signature pad"},
    "card_reader": {"id": "Pembaca kartu (card reader)", "en": "Smart-card reader"},
    "ups": {"id": "UPS", "en": "UPS"},
}

# {title} is the probe's title, {m} the probe's detail.
REASONS = {
    "probe_failed": {"id": "pemeriksaan gagal: {m}", "en": "check failed: {m}"},
    "timeout": {"id": "pemeriksaan tidak selesai ({m})", "en": "check did not finish ({m})"},
    "disk_low": {"id": "ruang disk hampir habis: {m}", "en": "disk almost full: {m}"},
    "disk_unreadable": {"id": "disk tidak dapat dibaca: {m}", "en": "cannot read disk: {m}"},
    "clock_skew": {"id": "jam komputer selisih {m} dari server", "en": "the PC clock is off by {m}"},
    "clock_unchecked": {"id": "jam komputer tidak dapat dicocokkan: {m}", "en": "cannot check the PC clock: {m}"},
    "no_answer": {"id": "tidak ada jawaban dari server tujuan: {m}", "en": "no answer from any target: {m}"},
    "target_down": {"id": "sebagian tujuan tidak menjawab: {m}", "en": "some targets do not answer: {m}"},
    "interface_down": {"id": "antarmuka jaringan mati: {m}", "en": "network interface down: {m}"},
    "not_detected": {"id": "{title} tidak terdeteksi", "en": "{title} not detected"},
    "other_unit": {"id": "unit lain terpasang (nomor seri terpasang / terdaftar: {m}); pinjaman atau pengganti?",
                   "en": "a different unit is plugged in (serial found / expected: {m}); lent or replaced?"},
    "driver_not_bound": {"id": "terpasang tetapi tidak ada driver yang aktif: {m}",
                         "en": "plugged in but no driver is bound: {m}"},
    "device_problem": {"id": "terpasang tetapi bermasalah di Device Manager (kode {m})",
                       "en": "plugged in but Device Manager shows a problem (code {m})"},
    "not_usable": {"id": "terpasang tetapi tidak dapat dipakai: {m}", "en": "plugged in but not usable: {m}"},
    "pcsc_no_reader": {"id": "terpasang tetapi tidak terlihat di layanan kartu pintar (PC/SC); yang terlihat: {m}",
                       "en": "plugged in but the smart-card service (PC/SC) does not list it; it lists: {m}"},
    "usb_unreadable": {"id": "daftar perangkat USB tidak dapat dibaca: {m}", "en": "cannot list USB devices: {m}"},
    "on_battery": {"id": "UPS memakai baterai (listrik PLN padam): {m}", "en": "UPS on battery (mains power failed): {m}"},
    "battery_low": {"id": "baterai UPS hampir habis, peralatan akan segera mati: {m}",
                    "en": "UPS battery low, the kit will lose power soon: {m}"},
    "ups_failed": {"id": "UPS melaporkan kerusakan (atau uji baterai gagal): {m}",
                   "en": "the UPS reports a fault (or a failed battery test): {m}"},
    "ups_shutdown": {"id": "UPS sedang mematikan listrik ke peralatan: {m}", "en": "the UPS is shutting down its output: {m}"},
    "ups_off": {"id": "keluaran listrik UPS mati: {m}", "en": "the UPS output is off: {m}"},
    "overload": {"id": "UPS kelebihan beban, kurangi alat yang dicolokkan: {m}",
                 "en": "the UPS is overloaded; unplug some equipment: {m}"},
    "replace_battery": {"id": "baterai UPS perlu diganti: {m}", "en": "the UPS battery needs replacing: {m}"},
    "no_reply": {"id": "UPS tidak menjawab (periksa kabel data dan apakah UPS menyala): {m}",
                 "en": "the UPS does not answer (check the data cable and that the UPS is on): {m}"},
    "garbled_reply": {"id": "jawaban UPS tidak dapat dibaca (periksa kabel dan pengaturan): {m}",
                      "en": "the UPS reply cannot be read (check the cable and settings): {m}"},
    "port_unavailable": {"id": "port serial UPS tidak dapat dibuka (kabel USB-serial tercabut?): {m}",
                         "en": "cannot open the UPS serial port (USB-serial cable unplugged?): {m}"},
    "daemon_unreachable": {"id": "layanan UPS (NUT/apcupsd) tidak dapat dihubungi: {m}",
                           "en": "cannot reach the UPS service (NUT/apcupsd): {m}"},
    "daemon_error": {"id": "layanan UPS menolak permintaan: {m}", "en": "the UPS service refused the request: {m}"},
}


def title(name: str, lang: str = "id") -> str:
    return TITLES.get(name, {}).get(lang, name)


def reason(name: str, code: str, detail: str, lang: str = "id") -> str:
    if not code:
        return detail
    template = REASONS.get(code, {}).get(lang)
    if template is None:
        return f"{code}: {detail}" if detail else code
    return template.format(title=title(name, lang), m=detail).rstrip(": ")


def _gb(value: int | None) -> str:
    return "?" if value is None else f"{value / 1e9:.1f} GB"


def readings(entry, lang: str = "id") -> str:
    """A short summary of an entry's readings."""
    kind = getattr(entry, "k", None) or type(entry).__struct_config__.tag
    words = {
        "id": {"cpu": "CPU", "mem": "memori bebas", "of": "dari", "free": "bebas", "skew": "selisih jam"},
        "en": {"cpu": "CPU", "mem": "memory available", "of": "of", "free": "free", "skew": "clock skew"},
    }[lang]
    parts: list[str] = []
    if kind == "host":
        if entry.cpu is not None:
            parts.append(f"{words['cpu']} {entry.cpu * 100:.0f}%")
        if entry.mem_avail is not None:
            parts.append(f"{words['mem']} {_gb(entry.mem_avail)} {words['of']} {_gb(entry.mem_total)}")
        for mount, disk in entry.disks.items():
            parts.append(f"disk {mount} {_gb(disk.free)} {words['free']}")
        if entry.skew is not None:
            parts.append(f"{words['skew']} {entry.skew:+.1f} s")
    elif kind == "link":
        target_word = {"id": ("terhubung", "terputus"), "en": ("up", "down")}[lang]
        iface_word = {"id": ("aktif", "mati"), "en": ("up", "down")}[lang]
        for name, target in entry.targets.items():
            rtt = f" {target.rtt * 1000:.1f} ms" if target.rtt is not None else ""
            state = target_word[0] if target.up else target_word[1]
            parts.append(f"{name} {state}{rtt} ({target.recv}/{target.sent})")
        for name, up in entry.ifaces.items():
            parts.append(f"{name} {iface_word[0] if up else iface_word[1]}")
    elif kind == "dev":
        name = " ".join(p for p in (entry.vendor, entry.product) if p) or (
            f"{entry.vid}:{entry.pid}" if entry.vid else "")
        if name:
            parts.append(name)
        if entry.serial:
            parts.append(("no. seri " if lang == "id" else "serial ") + entry.serial)
        if entry.bus:
            parts.append(("port USB " if lang == "id" else "USB port ") + entry.bus)
        if entry.count and entry.count > 1:
            parts.append(f"{entry.count} unit")
    elif kind == "ups":
        w = {"id": ("baterai", "listrik PLN", "beban", "isi baterai (perkiraan)", "masukan"),
             "en": ("on battery", "mains", "load", "charge (estimate)", "input")}[lang]
        if entry.on_batt is not None:
            parts.append(w[0] if entry.on_batt else w[1])
        if entry.in_v is not None:
            parts.append(f"{w[4]} {entry.in_v:.0f} V")
        if entry.load is not None:
            parts.append(f"{w[2]} {entry.load * 100:.0f}%")
        if entry.charge is not None:
            parts.append(f"{w[3]} {entry.charge * 100:.0f}%")
        model = " ".join(p for p in (entry.vendor, entry.model) if p)
        if model:
            parts.append(model)
    return ", ".join(parts)


def describe(name: str, entry, lang: str = "id") -> str:
    """One line for a person: what is wrong (if anything) and the main readings."""
    why = reason(name, entry.c, entry.m, lang)
    values = readings(entry, lang)
    return "; ".join(part for part in (why, values) if part)
