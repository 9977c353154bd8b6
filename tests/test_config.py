import logging
import os
import tempfile
from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError, load, parse_size

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, doc, name="agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def base(tmp_path, **changes):
    doc = {
        "kit": {"kabupaten": "sintang", "kecamatan": "dedai", "id": "kit-1"},
        "broker": {"url": "mqtts://broker.example:8883"},
        "state_dir": str(tmp_path / "state"),
        "probes": {"host": {}, "link": {"targets": {"district": {"host": "siak.example", "port": 443}}}},
    }
    doc.update(changes)
    return doc


def error_for(tmp_path, doc) -> ConfigError:
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(path) in str(err.value), "the message names the file"
    return err.value


def test_example_config_loads():
    config = load(ROOT / "config" / "agent.example.yaml")
    assert config.broker.tls, "the example uses TLS"
    assert {spec.name for spec in config.probes} >= {"host", "link"}


def test_defaults(tmp_path):
    config = load(write(tmp_path, base(tmp_path)))
    assert config.raw.heartbeat == 60
    assert config.queue_max_bytes == 50 * 1024 * 1024
    assert (config.broker.host, config.broker.port, config.broker.tls) == ("broker.example", 8883, True)
    host = next(spec for spec in config.probes if spec.name == "host")
    assert (host.interval, host.timeout) == (60.0, 10.0)


def test_missing_key_named(tmp_path):
    doc = base(tmp_path)
    del doc["kit"]["kecamatan"]
    err = error_for(tmp_path, doc)
    assert err.key == "kit.kecamatan"
    assert "required" in err.message


def test_wrong_type_named_in_plain_words(tmp_path):
    doc = base(tmp_path, heartbeat="sixty")
    err = error_for(tmp_path, doc)
    assert err.key == "heartbeat"
    assert err.message == "expected a whole number, got text"


def test_wrong_type_inside_probe_options(tmp_path):
    doc = base(tmp_path)
    doc["probes"]["link"]["targets"]["district"]["port"] = "https"
    err = error_for(tmp_path, doc)
    assert err.key == "probes.link.targets.district.port"
    assert "whole number" in err.message


def test_unknown_key_is_a_typo(tmp_path):
    doc = base(tmp_path)
    doc["broker"]["keepalvie"] = 30
    err = error_for(tmp_path, doc)
    assert err.key == "broker.keepalvie"
    assert "unknown key" in err.message


def test_bad_slug(tmp_path):
    doc = base(tmp_path)
    doc["kit"]["kecamatan"] = "Binjai Hulu"
    err = error_for(tmp_path, doc)
    assert err.key == "kit.kecamatan"
    assert "lower-case" in err.message


def test_out_of_range(tmp_path):
    err = error_for(tmp_path, base(tmp_path, heartbeat=-5))
    assert err.key == "heartbeat"
    assert ">= 1" in err.message


def test_unreadable_password_file(tmp_path):
    doc = base(tmp_path)
    doc["broker"].update(username="kit-1", password_file=str(tmp_path / "nope.txt"))
    err = error_for(tmp_path, doc)
    assert err.key == "broker.password_file"
    assert "nope.txt" in err.message and "No such file" in err.message


def _load_as_unprivileged(path: Path) -> ConfigError | None:
    """load() in a forked child that drops root first, as the agent's service user would run."""
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            load(path)
            message = b"no error"
        except ConfigError as exc:
            message = f"{exc.key}|{exc.message}".encode()
        except BaseException as exc:  # noqa: BLE001
            message = f"crash|{exc!r}".encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read, "rb") as fh:
        text = fh.read().decode()
    os.waitpid(pid, 0)
    return text


def test_password_file_without_permission():
    work = Path(tempfile.mkdtemp(prefix="ektp-perm-"))
    work.chmod(0o755)
    secret = work / "secret"
    secret.write_text("pw")
    secret.chmod(0o600 if os.geteuid() == 0 else 0)
    doc = base(work)
    doc["broker"].update(username="kit-1", password_file=str(secret))
    config = write(work, doc)
    config.chmod(0o644)
    key, _, message = _load_as_unprivileged(config).partition("|")
    assert key == "broker.password_file"
    assert "Permission denied" in message and str(secret) in message


def test_password_file_is_a_directory(tmp_path):
    doc = base(tmp_path)
    doc["broker"].update(username="kit-1", password_file=str(tmp_path))
    err = error_for(tmp_path, doc)
    assert err.key == "broker.password_file"
    assert "cannot read" in err.message


def test_password_read_and_world_readable_warned(tmp_path, caplog):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    secret.chmod(0o644)
    doc = base(tmp_path)
    doc["broker"].update(username="kit-1", password_file=str(secret))
    with caplog.at_level(logging.WARNING):
        config = load(write(tmp_path, doc))
    assert config.password.reveal() == "s3cr3t"
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(config.password)
    assert "readable by other users" in caplog.text
    assert "s3cr3t" not in caplog.text
    secret.chmod(0o600)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load(write(tmp_path, doc))
    assert "readable" not in caplog.text


def test_tls_file_missing(tmp_path):
    doc = base(tmp_path)
    doc["broker"]["tls"] = {"ca": str(tmp_path / "ca.pem")}
    err = error_for(tmp_path, doc)
    assert err.key == "broker.tls.ca"
    assert "does not exist" in err.message


@pytest.mark.parametrize(
    "url,needle",
    [("http://broker:80", "mqtts://"), ("mqtts://", "no host"), ("mqtt://u:p@host", "password_file"),
     ("mqtt://host:99999", "port")],
)
def test_bad_broker_url(tmp_path, url, needle):
    doc = base(tmp_path)
    doc["broker"]["url"] = url
    err = error_for(tmp_path, doc)
    assert err.key == "broker.url"
    assert needle in err.message


def test_unknown_probe_type(tmp_path):
    doc = base(tmp_path)
    doc["probes"]["toaster"] = {}
    err = error_for(tmp_path, doc)
    assert err.key == "probes.toaster.type"
    assert "known types" in err.message


def test_timeout_longer_than_interval(tmp_path):
    doc = base(tmp_path)
    doc["probes"]["host"] = {"interval": 5, "timeout": 30}
    assert error_for(tmp_path, doc).key == "probes.host.timeout"


def test_disabled_probe_left_out(tmp_path):
    doc = base(tmp_path)
    doc["probes"]["link"]["enabled"] = False
    assert [spec.name for spec in load(write(tmp_path, doc)).probes] == ["host"]


def test_yaml_syntax_error_has_line(tmp_path):
    err = error_for(tmp_path, "kit:\n  kabupaten: sintang\n broker: [\n")
    assert "line" in err.message and "YAML" in err.message


def test_empty_and_missing_files(tmp_path):
    assert "empty" in error_for(tmp_path, "").message
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "absent.yaml")
    assert "cannot read" in str(err.value)


def test_sizes(tmp_path):
    assert parse_size("50MB") == 50 * 1024**2
    assert parse_size("512 KiB") == 512 * 1024
    assert parse_size(4096) == 4096
    doc = base(tmp_path, queue={"max_size": "lots"})
    assert error_for(tmp_path, doc).key == "queue.max_size"
