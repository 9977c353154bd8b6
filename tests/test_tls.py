"""TLS: the agent trusts only the configured CA and checks the broker's host name."""

import pytest
import trustme

from collector.devbroker import Mosquitto
from conftest import wait_for, write_agent_config


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    other_ca = trustme.CA()
    files = {}
    for name, authority, hosts in [("good", ca, ["127.0.0.1", "localhost"]), ("wrong-host", ca, ["broker.example"])]:
        cert = authority.issue_cert(*hosts)
        files[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(files[name][0])
        cert.private_key_pem.write_to_path(files[name][1])
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    other_ca.cert_pem.write_to_path(tmp_path / "other-ca.pem")
    return {"ca": tmp_path / "ca.pem", "other": tmp_path / "other-ca.pem", **files}


def tls_broker(tmp_path, pki, cert="good"):
    certfile, keyfile = pki[cert]
    return Mosquitto(tmp_path / f"broker-{cert}", tls=(str(pki["ca"]), str(certfile), str(keyfile))).start()


def test_agent_connects_with_the_configured_ca(tmp_path, pki, recorder_factory, agent_process):
    broker = tls_broker(tmp_path, pki)
    try:
        assert broker.url.startswith("mqtts://")
        rec = recorder_factory(broker, tls_ca=str(pki["ca"]))
        cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state",
                                 broker={"tls": {"ca": str(pki["ca"])}})
        agent = agent_process(cfg)
        wait_for(lambda: rec.reports(), timeout=15, what="a report over TLS")
        assert rec.statuses()[0].state == "online"
        assert "(TLS)" in agent.log()
    finally:
        broker.stop()


@pytest.mark.parametrize("case", ["unknown-ca", "wrong-host", "system-store"])
def test_agent_refuses_an_untrusted_broker(tmp_path, pki, recorder_factory, agent_process, case):
    broker = tls_broker(tmp_path, pki, cert="wrong-host" if case == "wrong-host" else "good")
    try:
        tls = {"unknown-ca": {"ca": str(pki["other"])}, "wrong-host": {"ca": str(pki["ca"])}, "system-store": {}}[case]
        cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state", broker={"tls": tls})
        agent = agent_process(cfg)
        line = wait_for(lambda: [ln for ln in agent.log().splitlines() if "cannot connect" in ln], timeout=15,
                        what="the refusal in the log")[0]
        assert "TLS certificate was not accepted" in line
        if case == "wrong-host":
            assert "mismatch, certificate is not valid for '127.0.0.1'" in line
        else:
            assert "self-signed certificate in certificate chain" in line or "local issuer" in line
        assert "New client connected" not in broker.log(), "no MQTT session was ever opened"
        assert agent.proc.poll() is None, "the agent keeps running and retrying"
    finally:
        broker.stop()
