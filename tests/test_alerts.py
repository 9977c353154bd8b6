"""Alert emails on an injected clock, delivered to a real SMTP server on loopback.

Scenarios that span hours run in milliseconds: the fleet, the alert engine and the mailer all
take `now` from the test; only the SMTP conversation is real.
"""

import email
import email.policy
import threading

import msgspec
import pytest
from aiosmtpd.controller import Controller

from agent import wire
from collector.alerts.engine import AlertEngine, AlertStore
from collector.alerts.mailer import Mailer
from collector.alerts.render import Renderer, duration
from collector.config import CollectorConfig
from collector.devbroker import free_port
from collector.fleet import Fleet

T0 = 1_800_000_000.0
KECAMATAN = ["ambalau", "binjai-hulu", "dedai", "kayan-hilir", "kayan-hulu", "kelam-permai", "ketungau-hilir",
             "ketungau-hulu", "ketungau-tengah", "sepauk", "serawai", "sintang", "sungai-tebelian", "tempunak"]
DEVICES = ("fingerprint", "iris", "camera", "signature_pad")
IT = "it@disdukcapil-sintang.example"
KASI = "kasi@disdukcapil-sintang.example"


class Inbox:
    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.messages.append((rcpt, message))
        return "250 OK"

    def to(self, rcpt):
        with self.lock:
            return [m for r, m in self.messages if r == rcpt]


class SmtpServer:
    def __init__(self):
        self.port = free_port()
        self.inbox = Inbox()
        self.controller = None

    def start(self):
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self):
        if self.controller:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def smtp():
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


class Scenario:
    """A fleet of 14 kecamatan with one kit each, kept alive by the test's clock."""

    def __init__(self, tmp_path, smtp, **alerts):
        doc = {
            "broker": {"url": "mqtt://127.0.0.1"},
            "inventory": {"sintang": {"name": "Kabupaten Sintang", "kecamatan": {
                kec: {"kits": ["kit-1"], "name": kec.replace("-", " ").title(),
                      "lat": 0.0 + i * 0.1, "lon": 111.0 + i * 0.1}  # illustrative coordinates
                for i, kec in enumerate(KECAMATAN)}}},
            "alerts": {"smtp": {"host": "127.0.0.1", "port": smtp.port, "security": "none", "timeout": 5,
                                "from_address": "ektp-monitor@disdukcapil-sintang.example"},
                       "recipients": {"everywhere": [IT], "kabupaten": {"sintang": [KASI]}},
                       "digest_window": 60, **alerts},
        }
        self.config = msgspec.convert(doc, CollectorConfig)
        self.path = tmp_path / "collector.sqlite"
        self.now = T0
        self.fleet = Fleet(self.config)
        self.states = {kec: {d: "ok" for d in DEVICES} | {"on_batt": False, "batt_low": False, "link": True}
                       for kec in KECAMATAN}
        self.alive = set(KECAMATAN)
        self.seq = dict.fromkeys(KECAMATAN, 0)
        self.last = dict.fromkeys(KECAMATAN, -1e9)
        self.open()
        for kec in KECAMATAN:
            self.fleet.apply_status(self.kit(kec), wire.Status(v=1, state="online", boot="aaaaaaaa", hb=60), self.now)
            self.report(kec)

    def open(self):
        cfg = self.config.alerts
        self.store = AlertStore(self.path)
        self.engine = AlertEngine(cfg, self.fleet, self.store, self.now)
        self.mailer = Mailer(cfg, None, self.store, Renderer(cfg.language, cfg.timezone))

    def restart(self):
        """A collector restart: alert state and outbox come back from the store."""
        self.store.close()
        self.open()

    @staticmethod
    def kit(kec):
        return wire.KitId("sintang", kec, "kit-1")

    def report(self, kec):
        state = self.states[kec]
        self.seq[kec] += 1
        entries = {d: wire.DeviceEntry(s=state[d], c="not_detected" if state[d] == "missing" else "")
                   for d in DEVICES}
        entries["ups"] = wire.UpsEntry(s="warn" if state["on_batt"] else "ok", on_batt=state["on_batt"],
                                       batt_low=state["batt_low"], charge=0.2 if state["batt_low"] else 0.9)
        entries["link"] = wire.LinkEntry(s="ok" if state["link"] else "error",
                                         targets={"district": wire.LinkTarget(up=state["link"])})
        report = wire.Report(v=1, kab="sintang", kec=kec, kit="kit-1", ts=self.now, boot="aaaaaaaa",
                             seq=self.seq[kec], hb=60, p=entries)
        self.fleet.apply_report(report, self.now)
        self.last[kec] = self.now

    def set(self, kec, **changes):
        self.states[kec].update(changes)
        self.report(kec)  # a change is reported at once

    def advance(self, seconds, step=5.0):
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for kec in self.alive:
                if self.now - self.last[kec] >= 60:
                    self.report(kec)
            self.fleet.sweep(self.now)
            self.engine.evaluate(self.now)
            self.mailer.dispatch(self.now)


def subjects(smtp, rcpt=IT):
    # unfolded as a mail client shows it
    return [" ".join(str(m["Subject"]).split()) for m in smtp.inbox.to(rcpt)]


def test_device_unplugged_one_down_one_recovered_with_downtime(tmp_path, smtp):
    s = Scenario(tmp_path, smtp)
    s.advance(600)
    assert subjects(smtp) == []
    s.set("dedai", iris="missing")
    s.advance(299)
    assert subjects(smtp) == [], "nothing before the 5-minute hold-down (plus the digest window)"
    s.advance(3600)
    assert subjects(smtp) == ["[e-KTP] Kec. Dedai kit-1: pemindai iris tidak terdeteksi"]
    body = smtp.inbox.to(IT)[0].get_body(("plain",)).get_content()
    assert "Kabupaten Sintang" in body and "pemindai iris tidak terdeteksi" in body
    assert "UPS           : listrik PLN" in body and "district terhubung" in body
    assert "Kecamatan terdekat yang dapat merekam: Binjai Hulu (kit-1)" in body
    html = smtp.inbox.to(IT)[0].get_body(("html",)).get_content()
    assert "<li>pemindai iris tidak terdeteksi</li>" in html
    assert subjects(smtp, KASI) == subjects(smtp), "kabupaten recipients get the same"
    s.set("dedai", iris="ok")
    s.advance(3600)
    down_for = 3600 + 299 + 5  # unplugged until replugged, as the fleet saw it
    assert subjects(smtp)[1] == f"[e-KTP] Kec. Dedai kit-1: pulih, dapat merekam lagi setelah {duration(down_for, 'id')}"
    assert len(subjects(smtp)) == 2


def test_flapping_link_for_an_hour_raises_at_most_one_alert(tmp_path, smtp):
    s = Scenario(tmp_path, smtp)
    for _ in range(60):  # down 30 s, up 30 s, for an hour
        s.set("serawai", link=False)
        s.advance(30)
        s.set("serawai", link=True)
        s.advance(30)
    s.advance(600)
    link_mail = [x for x in subjects(smtp) if "server district" in x or "jaringan" in x]
    assert len(link_mail) <= 1
    assert subjects(smtp) == [], "never down for the whole hold-down, so no email at all"


def test_link_down_past_hold_down_fires_once_and_recovers(tmp_path, smtp):
    s = Scenario(tmp_path, smtp)
    s.set("serawai", link=False)
    s.advance(900)
    s.set("serawai", link=True)
    s.set("serawai", link=False)  # a blip while recovering keeps the same alert open
    s.advance(60)
    s.set("serawai", link=True)
    s.advance(900)
    assert subjects(smtp) == ["[e-KTP] Kec. Serawai kit-1: tidak ada jawaban dari server district",
                              "[e-KTP] Kec. Serawai kit-1: jaringan ke district pulih"]


def test_district_outage_gives_one_digest_per_recipient(tmp_path, smtp):
    s = Scenario(tmp_path, smtp)
    s.advance(600)
    for kec in KECAMATAN:  # every kit falls silent within a minute
        s.alive.discard(kec)
        s.advance(4)
    s.advance(1200)
    for rcpt in (IT, KASI):
        mail = smtp.inbox.to(rcpt)
        assert len(mail) == 1, [m["Subject"] for m in mail]
        assert subjects(smtp, rcpt)[0].startswith("[e-KTP] 14 pemberitahuan: Kec. Ambalau kit-1")
        body = mail[0].get_body(("plain",)).get_content()
        assert body.count("kit tidak aktif (offline)") == 14


def test_smtp_down_then_back_delivers_once(tmp_path, smtp):
    s = Scenario(tmp_path, smtp)
    smtp.stop()
    s.set("dedai", fingerprint="missing")
    s.advance(900)
    assert s.store.queued() == 2 and s.mailer.failures >= 1
    smtp.start()
    s.advance(3600)
    assert subjects(smtp) == ["[e-KTP] Kec. Dedai kit-1: pemindai sidik jari tidak terdeteksi"]
    s.advance(3600)
    assert len(smtp.inbox.to(IT)) == 1 and s.store.queued() == 0


def test_restart_mid_incident_neither_loses_nor_repeats(tmp_path, smtp):
    s = Scenario(tmp_path, smtp)
    s.set("dedai", camera="error")
    s.advance(600)
    assert len(subjects(smtp)) == 1
    s.restart()
    s.advance(3600)
    assert len(subjects(smtp)) == 1, "the restarted collector knows the alert is already out"
    # restart with an email still queued: it goes out exactly once afterwards
    s.set("sepauk", signature_pad="missing")
    s.advance(301)
    assert s.store.queued() == 2
    s.restart()
    s.advance(600)
    assert [x for x in subjects(smtp) if "Sepauk" in x] == [
        "[e-KTP] Kec. Sepauk kit-1: alat tanda tangan (signature pad) tidak terdeteksi"]


def test_reminders_every_24_hours(tmp_path, smtp):
    s = Scenario(tmp_path, smtp)
    s.set("tempunak", iris="missing", camera="missing")
    s.advance(3 * 86400 + 600, step=60)
    got = subjects(smtp)
    assert got[0] == "[e-KTP] Kec. Tempunak kit-1: pemindai iris tidak terdeteksi, kamera tidak terdeteksi"
    assert got[1:] == [got[0] + " (pengingat)"] * 3


def test_power_warning_then_critical_then_mains(tmp_path, smtp):
    s = Scenario(tmp_path, smtp)
    s.set("kelam-permai", on_batt=True)
    s.advance(300)
    s.set("kelam-permai", batt_low=True)
    s.advance(300)
    s.set("kelam-permai", on_batt=False, batt_low=False)
    s.advance(600)
    assert subjects(smtp) == [
        "[e-KTP] Kec. Kelam Permai kit-1: UPS memakai baterai (listrik PLN padam)",
        "[e-KTP] Kec. Kelam Permai kit-1: baterai UPS hampir habis",
        "[e-KTP] Kec. Kelam Permai kit-1: listrik PLN kembali, UPS tidak lagi memakai baterai",
    ]


def test_stale_expected_kit_reported_daily(tmp_path, smtp):
    s = Scenario(tmp_path, smtp, stale={"hold": 3600, "repeat": 86400})
    silent = wire.KitId("sintang", "ambalau", "kit-2")
    s.fleet.kits[silent] = type(s.fleet.kits[s.kit("ambalau")])(silent, expected=True)
    s.advance(2 * 86400 + 3600 + 600, step=60)
    stale = [x for x in subjects(smtp) if "belum pernah melapor" in x]
    assert stale == ["[e-KTP] Kec. Ambalau kit-2: belum pernah melapor ke server kabupaten"] + \
        ["[e-KTP] Kec. Ambalau kit-2: belum pernah melapor ke server kabupaten (pengingat)"] * 2


def test_english_and_test_address(tmp_path, smtp):
    s = Scenario(tmp_path, smtp, language="en", test_address="dryrun@example.org")
    s.set("dedai", iris="missing")
    s.advance(600)
    assert subjects(smtp, IT) == []
    assert subjects(smtp, "dryrun@example.org") == ["[e-KTP] Kec. Dedai kit-1: iris scanner not detected"]


def test_templates_a_district_can_edit(tmp_path, smtp):
    custom = tmp_path / "templates" / "id"
    custom.mkdir(parents=True)
    (custom / "subject.txt").write_text("[KTP-el] {{ n.kecamatan_name }}: {% include '_headline.txt' %}\n")
    s = Scenario(tmp_path, smtp, templates_dir=str(tmp_path / "templates"))
    s.mailer.renderer = Renderer("id", "Asia/Jakarta", str(tmp_path / "templates"))
    s.set("dedai", iris="missing")
    s.advance(600)
    assert subjects(smtp) == ["[KTP-el] Dedai: pemindai iris tidak terdeteksi"]
