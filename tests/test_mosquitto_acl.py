"""The example district broker (config/mosquitto/): TLS, per-kit accounts, and an ACL under which
a kit can write only its own topics and the collector reads them all.

Every test starts a real Mosquitto from config/mosquitto/mosquitto.conf installed the way the
README says (a conf.d drop-in under a Debian-like main config) with config/mosquitto/acl as is;
only file paths and the port are rewritten to temporary ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import wire
from collector.devbroker import Mosquitto
from conftest import ROOT, wait_for, write_agent_config

EXAMPLE_CONF = ROOT / "config" / "mosquitto" / "mosquitto.conf"
EXAMPLE_ACL = ROOT / "config" / "mosquitto" / "acl"

KIT_A = wire.KitId("sintang", "dedai", "kit-1")
KIT_B = wire.KitId("sintang", "dedai", "kit-2")
PASSWORDS = {
    "sintang/dedai/kit-1": "kit-1-secret",
    "sintang/dedai/kit-2": "kit-2-secret",
    "ektp-collector": "collector-secret",
    "ektp-ops": "ops-secret",
}


def user(kit: wire.KitId) -> str:
    """A kit's broker account is its topic path (see config/mosquitto/acl)."""
    return f"{kit.kabupaten}/{kit.kecamatan}/{kit.kit}"


def mosquitto_passwd() -> str:
    path = shutil.which("mosquitto_passwd")
    if path is None:
        pytest.fail("mosquitto_passwd is missing; it comes with the mosquitto package: sudo apt-get install -y mosquitto")
    return path


class ExampleBroker(Mosquitto):
    """Mosquitto running config/mosquitto/mosquitto.conf as /etc/mosquitto/conf.d/ektp.conf."""

    def __init__(self, workdir: Path, files: dict[str, str]):
        super().__init__(workdir, tls=(files["cafile"], files["certfile"], files["keyfile"]), anonymous=False)
        self.files = files

    def _dropin(self) -> str:
        rewritten, seen = [], set()
        for line in EXAMPLE_CONF.read_text().splitlines():
            words = line.split()
            if not words or words[0].startswith("#"):
                rewritten.append(line)
                continue
            key = words[0]
            if key == "listener":
                assert words[1:] == ["8883"], "the example listens on 8883 on every address"
                line = f"listener {self.port} {self.host}"
            elif key in self.files:
                line = f"{key} {self.files[key]}"
            else:
                assert not any(w.startswith("/") for w in words[1:]), f"a path this test does not rewrite: {line}"
            seen.add(key)
            rewritten.append(line)
        missing = {"listener", "allow_anonymous", "password_file", "acl_file", "per_listener_settings"} - seen
        assert not missing, f"the example config lacks {missing}"
        return "\n".join(rewritten) + "\n"

    def _config(self) -> str:
        # What Debian's /etc/mosquitto/mosquitto.conf holds (pid_file left out), then conf.d/.
        confd = self.workdir / "conf.d"
        confd.mkdir(exist_ok=True)
        (confd / "ektp.conf").write_text(self._dropin())
        lines = [
            "persistence true",
            f"persistence_location {self.workdir}/",
            "log_dest stderr",  # unbuffered, into Mosquitto.log()
            "log_type all",
            "log_timestamp_format %H:%M:%S",
            *self._run_as(),
            f"include_dir {confd}",
        ]
        return "\n".join(lines) + "\n"


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"cafile": tmp_path / "ca.pem", "certfile": tmp_path / "server.pem", "keyfile": tmp_path / "server.key"}
    ca.cert_pem.write_to_path(paths["cafile"])
    server.cert_chain_pems[0].write_to_path(paths["certfile"])
    server.private_key_pem.write_to_path(paths["keyfile"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def example_broker(tmp_path, pki):
    passwd = tmp_path / "ektp.passwd"
    tool = mosquitto_passwd()
    for i, (name, password) in enumerate(PASSWORDS.items()):
        subprocess.run([tool, "-b", *(["-c"] if i == 0 else []), str(passwd), name, password], check=True,
                       capture_output=True, timeout=30)
    files = {**pki, "password_file": str(passwd), "acl_file": str(EXAMPLE_ACL)}
    broker = ExampleBroker(tmp_path / "broker", files).start()
    yield broker
    broker.stop()


class Client:
    """A paho client that records CONNACK, SUBACK and PUBACK reason codes and what it receives."""

    def __init__(self, broker: Mosquitto, ca: str | None, username: str | None = None, password: str | None = None,
                 client_id: str = "", will: tuple[str, bytes] | None = None,
                 subscribe: str | list[str] | None = None):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connack: list = []
        self.suback: list = []
        self.puback: dict[int, object] = {}
        self.disconnects = 0
        self.lock = threading.Lock()
        self.topic = subscribe
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
        c.reconnect_delay_set(5, 5)  # a refused client is asserted on its first CONNACK, not retried fast
        if ca:
            c.tls_set(ca_certs=ca)
        if username is not None:
            c.username_pw_set(username, password)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda cl, ud, mid, codes, props: self.suback.append(codes)
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        self.client = c
        c.connect_async(broker.host, broker.port)
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack.append(reason_code)
        if not reason_code.is_failure and self.topic:
            topics = [self.topic] if isinstance(self.topic, str) else self.topic
            client.subscribe([(t, 1) for t in topics])

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.lock:
            self.puback[mid] = reason_code

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_disconnect(self, *args):
        self.disconnects += 1

    def ready(self, timeout: float = 10.0) -> "Client":
        """Waits for a successful CONNACK (and SUBACK when subscribing)."""
        wait_for(lambda: self.connack, timeout, what="CONNACK")
        assert not self.connack[0].is_failure, f"connection refused: {self.connack[0]}"
        if self.topic:
            wait_for(lambda: self.suback, timeout, what="SUBACK")
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False):
        """Publishes at QoS 1 and returns the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return wait_for(lambda: self.puback.get(info.mid), 10, what=f"PUBACK for {topic}")

    def received(self, topic_part: str = "") -> list[tuple[str, bytes, bool]]:
        with self.lock:
            return [m for m in self.messages if topic_part in m[0]]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(*args, **kw) -> Client:
        made.append(Client(*args, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def kit_client(clients, broker, ca, kit: wire.KitId, **kw) -> Client:
    return clients(broker, ca, user(kit), PASSWORDS[user(kit)], **kw).ready()


def collector_client(clients, broker, ca, name="ektp-collector", topic="ektp/v1/#") -> Client:
    return clients(broker, ca, name, PASSWORDS[name], subscribe=topic).ready()


def report(kit: wire.KitId, seq: int = 1) -> bytes:
    return wire.encode(wire.Report(v=wire.SCHEMA_VERSION, kab=kit.kabupaten, kec=kit.kecamatan, kit=kit.kit,
                                   ts=time.time(), boot="0123abcd", seq=seq, hb=60,
                                   p={"host": wire.HostEntry(s="ok")}))


def status(state: str = "online") -> bytes:
    return wire.encode(wire.Status(v=wire.SCHEMA_VERSION, state=state, boot="0123abcd", ts=time.time()))


def test_a_kit_publishes_its_own_report_and_the_collector_receives_it(example_broker, pki, clients):
    collector = collector_client(clients, example_broker, pki["cafile"])
    assert collector.suback[0][0].value == 1, "the collector may subscribe to every kit (granted QoS 1)"
    kit = kit_client(clients, example_broker, pki["cafile"], KIT_A)
    assert kit.publish(wire.topic(KIT_A, "status"), status(), retain=True).value == 0
    assert kit.publish(wire.topic(KIT_A, "report"), report(KIT_A)).value == 0
    wait_for(lambda: collector.received(wire.topic(KIT_A, "report")), what="kit A's report at the collector")
    (topic, payload, _), = collector.received(wire.topic(KIT_A, "report"))
    assert wire.decode_report(payload, KIT_A).seq == 1
    assert collector.received(wire.topic(KIT_A, "status")), "and its status"


def test_a_kit_cannot_publish_on_another_kits_topics(example_broker, pki, clients):
    ca = pki["cafile"]
    collector = collector_client(clients, example_broker, ca)
    kit_a = kit_client(clients, example_broker, ca, KIT_A)
    kit_a.publish(wire.topic(KIT_A, "status"), status(), retain=True)
    # Well-formed messages in kit B's name: a report, a retained "offline" status, and a stray topic.
    refused = [
        kit_a.publish(wire.topic(KIT_B, "report"), report(KIT_B, seq=7)),
        kit_a.publish(wire.topic(KIT_B, "status"), status("offline"), retain=True),
        kit_a.publish("ektp/v1/sintang/dedai/kit-1/other", b"x"),
        kit_a.publish("ektp/v1/sintang/dedai/kit-1", b"x"),
    ]
    assert [code.getName() for code in refused] == ["Not authorized"] * 4, "the broker says so in the PUBACK"
    # Then a marker from kit A on its own topic: messages from one client at QoS 1 arrive in order,
    # so once the marker is in, anything published before it would have been too.
    kit_a.publish(wire.topic(KIT_A, "report"), report(KIT_A, seq=2))
    wait_for(lambda: collector.received(wire.topic(KIT_A, "report")), what="kit A's marker report")
    assert collector.received(KIT_B.kit) == [], "nothing in kit B's name reached the collector"
    assert [m[0] for m in collector.received()] == [wire.topic(KIT_A, "status"), wire.topic(KIT_A, "report")]
    assert "Denied PUBLISH from sintang/dedai/kit-1" in example_broker.log()

    # Nor was anything retained for kit B: a new subscriber gets kit A's retained status only.
    ops = collector_client(clients, example_broker, ca, name="ektp-ops", topic="ektp/v1/sintang/dedai/#")
    kit_a.publish(wire.topic(KIT_A, "report"), report(KIT_A, seq=3))
    wait_for(lambda: ops.received(wire.topic(KIT_A, "report")), what="the marker at a fresh subscriber")
    assert [(t, r) for t, _, r in ops.received()] == [(wire.topic(KIT_A, "status"), True),
                                                     (wire.topic(KIT_A, "report"), False)]


def test_a_kit_cannot_read_any_kits_topics(example_broker, pki, clients):
    """Mosquitto 2.0 grants the subscription and checks read access on every delivery, so the proof
    is in the broker's debug log: it routes a message to every subscriber in one pass and logs each
    PUBLISH it sends, so once the collector's copy of a later message is logged, a copy for the kit
    would have been logged before it."""
    ca = pki["cafile"]
    collector = collector_client(clients, example_broker, ca)
    kit_b = kit_client(clients, example_broker, ca, KIT_B)
    kit_b.publish(wire.topic(KIT_B, "status"), status(), retain=True)
    topics = ["#", "ektp/v1/#", wire.topic(KIT_B, "report"), wire.topic(KIT_B, "status"), wire.topic(KIT_A, "report")]
    spy = clients(example_broker, ca, user(KIT_A), PASSWORDS[user(KIT_A)], subscribe=topics).ready()
    kit_b.publish(wire.topic(KIT_B, "report"), report(KIT_B, seq=1))
    kit_b.publish(wire.topic(KIT_B, "report"), report(KIT_B, seq=2))
    to_collector = f"Sending PUBLISH to ektp-collector (d0, q1, r0, m3, '{wire.topic(KIT_B, 'report')}'"
    wait_for(lambda: to_collector in example_broker.log(), what="the collector's copy of the second report")
    wait_for(lambda: len(collector.received(KIT_B.kit)) == 3, what="status and both reports at the collector")
    assert "Sending PUBLISH to ektp-collector (d0, q1, r0, m1, 'ektp/v1/sintang/dedai/kit-2/status'" in \
        example_broker.log(), "the log names each delivery as this test expects"
    assert "Sending PUBLISH to sintang/dedai/kit-1 " not in example_broker.log(), "nothing was sent to kit A"
    assert spy.received() == []


def test_a_kit_cannot_take_over_another_kits_connection(example_broker, pki, clients):
    """The broker uses the user name as client id, so kit A connecting with kit B's client id does
    not push B off (which would publish B's Last Will, "offline", in B's name)."""
    ca = pki["cafile"]
    collector = collector_client(clients, example_broker, ca)
    kit_b = kit_client(clients, example_broker, ca, KIT_B, client_id="ektp-agent-sintang-dedai-kit-2",
                       will=(wire.topic(KIT_B, "status"), status("offline")))
    kit_a = kit_client(clients, example_broker, ca, KIT_A, client_id="ektp-agent-sintang-dedai-kit-2")
    kit_a.publish(wire.topic(KIT_A, "report"), report(KIT_A))
    wait_for(lambda: collector.received(wire.topic(KIT_A, "report")), what="kit A's report")
    assert kit_b.client.is_connected() and kit_b.disconnects == 0
    assert collector.received(KIT_B.kit) == [], "no Last Will was published for kit B"
    # And the collector's own session cannot be taken by a kit either.
    kit_client(clients, example_broker, ca, KIT_A, client_id="ektp-collector")
    kit_a.publish(wire.topic(KIT_A, "report"), report(KIT_A, seq=2))
    wait_for(lambda: len(collector.received(wire.topic(KIT_A, "report"))) == 2, what="a second report")
    assert collector.disconnects == 0


@pytest.mark.parametrize("case", ["anonymous", "wrong-password", "unknown-user", "collector-password-for-kit"])
def test_the_broker_refuses_clients_without_valid_credentials(example_broker, pki, clients, case):
    username, password = {
        "anonymous": (None, None),
        "wrong-password": (user(KIT_A), "not-the-password"),
        "unknown-user": ("sintang/dedai/kit-9", "kit-9-secret"),
        "collector-password-for-kit": (user(KIT_A), PASSWORDS["ektp-collector"]),
    }[case]
    client = clients(example_broker, pki["cafile"], username, password)
    code = wait_for(lambda: client.connack, what="CONNACK")[0]
    assert code.is_failure
    assert code.getName() in ("Not authorized", "Bad user name or password"), code.getName()


def test_the_broker_refuses_plain_text(example_broker, pki, clients):
    client = clients(example_broker, None, user(KIT_A), PASSWORDS[user(KIT_A)])
    wait_for(lambda: client.disconnects, what="the connection to be dropped")
    assert client.connack == [], "no MQTT session without TLS"


def test_a_real_agent_reaches_the_real_collector_through_the_example_broker(
        example_broker, pki, tmp_path, agent_process, collector_factory):
    ca = pki["cafile"]
    password_file = tmp_path / "kit-password"
    password_file.write_text(PASSWORDS[user(KIT_A)] + "\n")
    password_file.chmod(0o600)
    collector_password = tmp_path / "collector-password"
    collector_password.write_text(PASSWORDS["ektp-collector"] + "\n")
    collector_password.chmod(0o600)
    collector = collector_factory(example_broker, broker={"username": "ektp-collector",
                                                         "password_file": str(collector_password),
                                                         "tls": {"ca": ca}})
    config = write_agent_config(tmp_path / "agent.yaml", example_broker, tmp_path / "state",
                                broker={"username": user(KIT_A), "password_file": str(password_file),
                                        "tls": {"ca": ca}})
    agent = agent_process(config)
    kit = wait_for(lambda: (k := collector.fleet.get(KIT_A)) and k.online and k.reports >= 1 and k,
                   timeout=20, what="the agent's birth and a report at the collector")
    assert kit.online and kit.reports >= 1
    assert "Denied" not in example_broker.log(), "the agent used only its own topics"
    assert "readable by other users" not in agent.log()
    assert PASSWORDS[user(KIT_A)] not in agent.log(), "the password is never logged"
    assert os.path.exists(tmp_path / "state")
