"""Prometheus alert rules and the Alertmanager example, checked by the tools that load them.

promtool checks the rules and runs the unit tests in tests/prometheus/ (hold-downs, a flapping kit
that never fires, keep_firing_for hysteresis, ...); amtool checks alertmanager.yml, its routing by
kabupaten and its email templates; and one test runs the real Alertmanager with that config against
an SMTP server on loopback, to see the digest, the routing and the inhibit rules in actual emails.
"""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from collector.devbroker import free_port

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "config" / "prometheus"
AM_DIR = ROOT / "config" / "alertmanager"
RULE_FILES = sorted(p for p in PROM_DIR.glob("*.yml") if p.name != "prometheus.example.yml")
UNIT_TESTS = sorted((ROOT / "tests" / "prometheus").glob("*.yml"))
KIT_LABELS = {"kabupaten", "kecamatan", "kit"}


def tool(name: str, package: str) -> str:
    """The path of a system tool; a missing one fails the test with the package to install."""
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()),
                                      None)
    if path is None:
        pytest.fail(f"{name} is not installed; run: sudo apt-get install -y {package} (or `make test` as root)")
    return path


def promtool() -> str:
    return tool("promtool", "prometheus")


def amtool() -> str:
    return tool("amtool", "prometheus-alertmanager")


def run(*cmd, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{output}"
    return output


def load_rules() -> list[dict]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend({**rule, "group": group["name"]} for rule in group["rules"])
    return rules


# -- Prometheus --------------------------------------------------------------------------------------


def test_rule_files_pass_promtool_check():
    assert RULE_FILES, "no rule files in config/prometheus"
    output = run(promtool(), "check", "rules", *RULE_FILES)
    assert "SUCCESS" in output


@pytest.mark.parametrize("path", UNIT_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(path):
    output = run(promtool(), "test", "rules", path)
    assert "SUCCESS" in output


def test_example_prometheus_config_is_valid():
    # rule_files in the example are relative to it and name the real rule files: checking the
    # config checks that it loads them.
    output = run(promtool(), "check", "config", PROM_DIR / "prometheus.example.yml")
    assert "alerts.yml" in output
    config = yaml.safe_load((PROM_DIR / "prometheus.example.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["ektp-collector"]["static_configs"][0]["targets"] == ["127.0.0.1:9847"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    # The collector-down rule matches the example's job name.
    down = next(r for r in load_rules() if r.get("alert") == "EktpCollectorDown")
    assert 'job="ektp-collector"' in down["expr"]


def test_every_alert_has_indonesian_texts_and_kit_labels():
    alerts = [r for r in load_rules() if "alert" in r]
    names = {r["alert"] for r in alerts}
    assert {"EktpKitDown", "EktpUpsOnBattery", "EktpUpsBatteryLow", "EktpLinkDown", "EktpKitNeverReported",
            "EktpCollectorDown", "EktpCollectorBrokerDisconnected"} <= names
    for rule in alerts:
        assert {"summary", "summary_en", "description"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        if rule["group"] == "ektp-kits":
            # routing and inhibition need the kit labels: no aggregation may drop them
            assert "by (" not in rule["expr"] and "without" not in rule["expr"], rule["alert"]
            assert "$labels.kecamatan" in rule["annotations"]["summary"], rule["alert"]
    # the hysteresis of the built-in engine (recovery holds) is keep_firing_for here
    holds = {r["alert"]: (r.get("for"), r.get("keep_firing_for")) for r in alerts}
    assert holds["EktpKitDown"] == ("5m", "5m")
    assert holds["EktpUpsOnBattery"] == ("1m", "2m")
    assert holds["EktpLinkDown"] == ("5m", "2m")
    assert holds["EktpKitNeverReported"][0] == "1h"


def test_every_alert_fires_in_some_unit_test():
    fired: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
                    for alert in check["exp_alerts"]:
                        labels = alert["exp_labels"]
                        if check["alertname"] not in ("EktpCollectorDown", "EktpCollectorBrokerDisconnected"):
                            assert KIT_LABELS <= set(labels), (path.name, case["name"])
    assert fired == {r["alert"] for r in load_rules() if "alert" in r}


# -- Alertmanager ------------------------------------------------------------------------------------


def test_alertmanager_config_is_valid():
    output = run(amtool(), "check-config", AM_DIR / "alertmanager.yml")
    assert "SUCCESS" in output and "1 templates" in output


@pytest.mark.parametrize("labels, receivers", [
    (["kabupaten=sintang", "alertname=EktpKitDown"], "ektp-semua,ektp-sintang"),
    (["kabupaten=oku", "alertname=EktpUpsOnBattery"], "ektp-semua,ektp-oku"),
    (["kabupaten=ketapang", "alertname=EktpKitDown"], "ektp-semua"),  # no route of its own
    (["alertname=EktpCollectorDown", "instance=127.0.0.1:9847"], "ektp-semua"),
])
def test_alertmanager_routes_by_kabupaten(labels, receivers):
    run(amtool(), "config", "routes", "test", f"--config.file={AM_DIR / 'alertmanager.yml'}",
        f"--verify.receivers={receivers}", *labels)


def test_alertmanager_config_settings():
    config = yaml.safe_load((AM_DIR / "alertmanager.yml").read_text())
    assert config["global"]["smtp_require_tls"] is True
    assert "smtp_auth_password" not in config["global"]  # only the _file variant
    route = config["route"]
    assert route["group_by"] == ["kabupaten"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == ("1m", "5m", "24h")
    inhibit = {r["target_matchers"][0]: r for r in config["inhibit_rules"]}
    assert inhibit['alertname="EktpLinkDown"']["equal"] == ["kabupaten", "kecamatan", "kit"]
    for receiver in config["receivers"]:
        for mail in receiver["email_configs"]:
            assert mail["send_resolved"] is True
            assert "ektp.subject" in mail["headers"]["Subject"]
            assert all(address.strip().endswith(".example") for address in mail["to"].split(","))


def render(template: str, data: dict, tmp_path: Path, kind: str = "text") -> str:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return subprocess.run(
        [amtool(), "template", "render", f"--template.glob={AM_DIR / 'ektp.tmpl'}", f"--template.data={path}",
         f"--template.type={kind}", f'--template.text={{{{ template "{template}" . }}}}'],
        capture_output=True, text=True, timeout=60, check=True, env={"TZ": "Asia/Jakarta", "PATH": "/usr/bin:/bin"},
    ).stdout


def alert(name, severity, kecamatan, kit, summary, description="", status="firing", starts="2024-05-02T01:07:00Z",
          ends="0001-01-01T00:00:00Z", **labels):
    return {"status": status, "startsAt": starts, "endsAt": ends,
            "labels": {"alertname": name, "severity": severity, "kabupaten": "sintang", "kecamatan": kecamatan,
                       "kit": kit, **labels},
            "annotations": {"summary": summary, "description": description}}


def test_email_templates_render(tmp_path):
    down = alert("EktpKitDown", "critical", "dedai", "kit-1", "Kec. dedai kit-1: kit tidak dapat merekam",
                 "Kit kit-1 di Kec. dedai (Kab. sintang) tidak siap merekam selama lebih dari 5 menit. "
                 "Perangkat yang tidak berfungsi: pemindai iris.")
    back = alert("EktpUpsOnBattery", "warning", "sepauk", "kit-2", "Kec. sepauk kit-2: UPS memakai baterai <PLN>",
                 status="resolved", starts="2024-05-02T01:00:00Z", ends="2024-05-02T02:13:20Z")
    data = {"receiver": "ektp-sintang", "status": "firing", "alerts": [down, back],
            "groupLabels": {"kabupaten": "sintang"}, "commonLabels": {"kabupaten": "sintang"},
            "commonAnnotations": {}, "externalURL": "http://alertmanager.disdukcapil.example:9093"}
    assert render("ektp.subject", data, tmp_path) == "[e-KTP] Kab. sintang: 1 gangguan aktif, 1 pulih"
    text = render("ektp.text", data, tmp_path)
    assert "GANGGUAN AKTIF (1)" in text and "Perangkat yang tidak berfungsi: pemindai iris." in text
    assert "Tingkat: KRITIS. Alert menyala sejak 02-05-2024 08:07 WIB." in text  # 01:07 UTC in Asia/Jakarta
    assert "PULIH (1)" in text and "Pulih 02-05-2024 09:13 WIB; alert aktif selama 1h13m0s." in text
    html = render("ektp.html", data, tmp_path, "html")
    assert "UPS memakai baterai &lt;PLN&gt;" in html  # annotations are escaped in HTML
    one = {**data, "alerts": [down]}
    assert render("ektp.subject", one, tmp_path) == "[e-KTP] Kec. dedai kit-1: kit tidak dapat merekam"
    gone = {**data, "alerts": [{**down, "status": "resolved", "endsAt": "2024-05-02T03:07:00Z"}]}
    assert render("ektp.subject", gone, tmp_path) == "[e-KTP] [PULIH] Kec. dedai kit-1: kit tidak dapat merekam"


class Inbox:
    def __init__(self):
        self.messages: list[tuple[str, email.message.EmailMessage]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.extend((rcpt, message) for rcpt in envelope.rcpt_tos)
        return "250 OK"

    def to(self, rcpt: str) -> list[email.message.EmailMessage]:
        with self.lock:
            return [m for r, m in self.messages if r == rcpt]


SMTP_PASSWORD = "rahasia-ektp"


def authenticate(server, session, envelope, mechanism, auth):
    return AuthResult(success=(auth.login, auth.password) == (b"ektp-monitor@disdukcapil.example",
                                                               SMTP_PASSWORD.encode()))


@pytest.mark.filterwarnings("ignore:Session.login_data:DeprecationWarning")
def test_alertmanager_sends_digests_by_kabupaten(tmp_path):
    """The real Alertmanager with the example config (SMTP pointed at loopback, shorter waits)."""
    binary = tool("prometheus-alertmanager", "prometheus-alertmanager")
    inbox = Inbox()
    # PLAIN only: aiosmtpd's LOGIN prompts differ from the "Username:" Alertmanager expects. No TLS on
    # loopback (Go allows PLAIN without TLS to 127.0.0.1 only), so smtp_require_tls is off here.
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port(), authenticator=authenticate,
                      auth_require_tls=False, auth_exclude_mechanism=["LOGIN"])
    smtp.start()
    # No trailing newline: Alertmanager 0.25 would send it as part of the password.
    (tmp_path / "smtp-password").write_text(SMTP_PASSWORD)
    config = yaml.safe_load((AM_DIR / "alertmanager.yml").read_text())
    config["global"].update(smtp_smarthost=f"127.0.0.1:{smtp.port}", smtp_require_tls=False,
                            smtp_auth_password_file=str(tmp_path / "smtp-password"))
    # group_wait gives the inhibitor time to see the source alerts before the first flush
    config["route"].update(group_wait="3s", group_interval="1s")
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config, allow_unicode=True))
    shutil.copy(AM_DIR / "ektp.tmpl", tmp_path / "ektp.tmpl")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", f"--web.external-url={url}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={"TZ": "Asia/Jakarta"},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "alertmanager.log").read_text()
            time.sleep(0.1)

        now = datetime.now(timezone.utc)
        # starting now: an alert older than group_wait is flushed at once, before the inhibitor
        # may have seen its source alert
        starts = now.isoformat()
        ends = (now + timedelta(hours=1)).isoformat()

        def posted(name, severity, summary, **labels):
            return {"labels": {"alertname": name, "severity": severity, "job": "ektp-collector",
                               "instance": "127.0.0.1:9847", **labels},
                    "annotations": {"summary": summary, "summary_en": summary, "description": f"({name})"},
                    "startsAt": starts, "endsAt": ends}

        dedai = {"kabupaten": "sintang", "kecamatan": "dedai", "kit": "kit-1"}
        sepauk = {"kabupaten": "sintang", "kecamatan": "sepauk", "kit": "kit-2"}
        alerts = [
            posted("EktpKitDown", "critical", "Kec. dedai kit-1: kit tidak dapat merekam", **dedai),
            posted("EktpLinkDown", "warning", "Kec. dedai kit-1: tidak ada jawaban dari server district",
                   target="district", **dedai),  # muted by the kit-down of the same kit
            posted("EktpUpsBatteryLow", "critical", "Kec. sepauk kit-2: baterai UPS hampir habis", **sepauk),
            posted("EktpUpsOnBattery", "warning", "Kec. sepauk kit-2: UPS memakai baterai", **sepauk),  # muted
            posted("EktpLinkDown", "warning", "Kec. sepauk kit-2: tidak ada jawaban dari server district",
                   target="district", **sepauk),  # not muted: this kit is not down
            posted("EktpKitDown", "critical", "Kec. baturaja-timur kit-1: kit tidak dapat merekam",
                   kabupaten="oku", kecamatan="baturaja-timur", kit="kit-1"),
        ]
        request = urllib.request.Request(url + "/api/v2/alerts", data=json.dumps(alerts).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

        def suppressed() -> int:  # the inhibitor has seen the source alerts (before group_wait ends)
            with urllib.request.urlopen(url + "/api/v2/alerts", timeout=10) as response:
                return sum(a["status"]["state"] == "suppressed" for a in json.load(response))

        deadline = time.monotonic() + 10
        while suppressed() < 2:
            assert time.monotonic() < deadline, "Alertmanager did not inhibit the two alerts"
            time.sleep(0.1)

        expected = {  # recipient -> number of emails: one digest per kabupaten group and route
            "it-disdukcapil@disdukcapil.example": 2,
            "it-sintang@disdukcapil.example": 1,
            "operator-sintang@disdukcapil.example": 1,
            "it-oku@disdukcapil.example": 1,
        }
        deadline = time.monotonic() + 30
        while any(len(inbox.to(r)) < n for r, n in expected.items()) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # anything extra (a second email per group) would arrive by now
        got = {r: len(inbox.to(r)) for r in expected}
        assert got == expected, (tmp_path / "alertmanager.log").read_text()

        sintang = inbox.to("it-sintang@disdukcapil.example")[0]
        assert sintang["Subject"] == "[e-KTP] Kab. sintang: 3 gangguan aktif"
        assert sintang["From"] == "e-KTP Monitor <ektp-monitor@disdukcapil.example>"
        body = sintang.get_body(("plain",)).get_content()
        assert "Kec. dedai kit-1: kit tidak dapat merekam" in body
        assert "Kec. sepauk kit-2: baterai UPS hampir habis" in body
        assert "Kec. sepauk kit-2: tidak ada jawaban dari server district" in body
        assert "Kec. dedai kit-1: tidak ada jawaban" not in body  # inhibited by EktpKitDown
        assert "UPS memakai baterai" not in body  # inhibited by EktpUpsBatteryLow
        assert "WIB" in body
        assert "Kec. dedai kit-1: kit tidak dapat merekam" in sintang.get_body(("html",)).get_content()
        oku = inbox.to("it-oku@disdukcapil.example")[0]
        assert oku["Subject"] == "[e-KTP] Kec. baturaja-timur kit-1: kit tidak dapat merekam"
        assert "sepauk" not in oku.get_body(("plain",)).get_content()
        subjects = sorted(m["Subject"] for m in inbox.to("it-disdukcapil@disdukcapil.example"))
        assert subjects == ["[e-KTP] Kab. sintang: 3 gangguan aktif",
                            "[e-KTP] Kec. baturaja-timur kit-1: kit tidak dapat merekam"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        smtp.stop()
