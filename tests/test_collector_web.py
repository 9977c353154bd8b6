"""The collector's HTTP endpoints with TLS and basic auth, and its config errors."""

import base64
import ssl
import urllib.request

import bcrypt
import pytest
import trustme
import yaml

from agent.config import ConfigError
from collector.config import load
from conftest import http_get, write_collector_config


@pytest.fixture
def web_config(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "web.pem")
    cert.private_key_pem.write_to_path(tmp_path / "web.key")
    ca.cert_pem.write_to_path(tmp_path / "web-ca.pem")
    hashed = bcrypt.hashpw(b"rahasia-dukcapil", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": "web.pem", "key_file": "web.key"},
        "basic_auth_users": {"prometheus": hashed},
    }))
    return path, tmp_path / "web-ca.pem"


def get(url, ca, user=None, password=None):
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    return http_get(request, context=context)


def test_tls_and_basic_auth(broker, collector_factory, web_config):
    path, ca = web_config
    collector = collector_factory(broker, http={"listen": "127.0.0.1:0", "web_config": str(path)})
    base = f"https://127.0.0.1:{collector.port}"
    assert get(base + "/metrics", ca)[0] == 401
    assert get(base + "/api/fleet", ca, "prometheus", "wrong")[0] == 401
    assert get(base + "/metrics", ca, "nobody", "rahasia-dukcapil")[0] == 401
    status, body = get(base + "/metrics", ca, "prometheus", "rahasia-dukcapil")
    assert status == 200 and b"ektp_collector_kits" in body
    assert get(base + "/healthz", ca, "prometheus", "rahasia-dukcapil") == (200, b"ok\n")
    with pytest.raises(OSError):  # plain HTTP to a TLS port gets no answer it can use
        urllib.request.urlopen(f"http://127.0.0.1:{collector.port}/metrics", timeout=5).read()


def error(tmp_path, broker, **overrides) -> ConfigError:
    path = write_collector_config(tmp_path / "c.yaml", broker, tmp_path / "c.sqlite", **overrides)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(path) in str(err.value) or err.value.file != str(path)
    return err.value


def test_config_errors_name_the_key(tmp_path, broker):
    assert error(tmp_path, broker, http={"listen": "9847"}).key == "http.listen"
    assert error(tmp_path, broker, fleet={"required_devices": ["toaster"]}).key == "fleet.required_devices[0]"
    err = error(tmp_path, broker, inventory={"sintang": {"kecamatan": {"Dedai Raya": {"kits": ["kit-1"]}}}})
    assert err.key.startswith("inventory.sintang.kecamatan")
    err = error(tmp_path, broker, fleet={"max_kits": 1},
                inventory={"sintang": {"kecamatan": {"dedai": {"kits": ["kit-1", "kit-2"]}}}})
    assert err.key == "fleet.max_kits"


def test_web_config_errors(tmp_path, broker):
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": "plain-text-password"}}))
    err = error(tmp_path, broker, http={"listen": "127.0.0.1:0", "web_config": str(web)})
    assert (err.file, err.key) == (str(web), "basic_auth_users.prometheus")
    assert "bcrypt" in err.message
    web.write_text(yaml.safe_dump({"tls_server_config": {"cert_file": "missing.pem", "key_file": "missing.key"}}))
    err = error(tmp_path, broker, http={"listen": "127.0.0.1:0", "web_config": str(web)})
    assert err.key == "tls_server_config.cert_file" and "does not exist" in err.message


def test_example_config_loads():
    from conftest import ROOT

    config = load(ROOT / "config" / "collector.example.yaml")
    assert config.broker.tls and config.raw.fleet.required_devices == ["fingerprint", "iris", "camera", "signature_pad"]


def test_listens_on_ipv6_loopback(broker, collector_factory):
    collector = collector_factory(broker, http={"listen": "[::1]:0"})
    status, body = http_get(f"http://[::1]:{collector.port}/healthz")
    assert (status, body) == (200, b"ok\n")


def test_every_metric_is_documented():
    from collector.metrics import metric_names
    from conftest import ROOT

    doc = (ROOT / "docs" / "collector.md").read_text()
    missing = sorted(name for name in metric_names() if f"`{name}`" not in doc)
    assert not missing, f"add to docs/collector.md: {missing}"
