"""The link probe over real sockets and the system ping, on loopback."""

import pytest

from agent import wire
from agent.config import convert
from agent.probes.base import ProbeContext
from agent.probes.link import LinkOptions, LinkProbe, icmp_socket_available, median, parse_ping_output
from collector.devbroker import free_port


def probe(**options) -> LinkProbe:
    opts = convert({"attempt_timeout": 1.0, "count": 2, **options}, LinkOptions, "test.yaml")
    return LinkProbe("link", opts, ProbeContext())


def test_tcp_target_up_and_counted(tcp_target):
    p = probe(targets={"district": {"host": "127.0.0.1", "port": tcp_target.port}})
    entry = p.run()
    target = entry.targets["district"]
    assert (entry.s, target.up, target.via, target.sent, target.recv) == ("ok", True, "tcp", 2, 2)
    assert 0 < target.rtt < 1
    entry = p.run()
    assert (entry.targets["district"].sent, entry.targets["district"].recv) == (4, 4), "counters accumulate"


def test_tcp_target_refused_is_down_and_counted_as_lost():
    p = probe(targets={"district": {"host": "127.0.0.1", "port": free_port()}})
    entry = p.run()
    target = entry.targets["district"]
    assert (entry.s, entry.c, target.up, target.sent, target.recv, target.rtt) == ("error", "no_answer", False, 2, 0, None)
    assert "refused" in entry.m.lower()


def test_one_of_two_targets_down_is_a_warning(tcp_target):
    p = probe(targets={"district": {"host": "127.0.0.1", "port": tcp_target.port},
                       "afis": {"host": "127.0.0.1", "port": free_port()}})
    entry = p.run()
    assert (entry.s, entry.c) == ("warn", "target_down")
    assert entry.m.startswith("afis:")


def test_change_key_follows_targets(tcp_target):
    p = probe(targets={"district": {"host": "127.0.0.1", "port": tcp_target.port}})
    up = p.run()
    assert p.change_key(up) == p.change_key(p.run()), "new counters or RTT are not a change"
    tcp_target.close()
    assert p.change_key(up) != p.change_key(p.run())


def test_icmp_through_system_ping():
    p = probe(targets={"gateway": {"host": "127.0.0.1"}}, icmp="command")
    entry = p.run()
    target = entry.targets["gateway"]
    assert (entry.s, target.via, target.up, target.recv) == ("ok", "icmp", True, 2)
    assert target.rtt is not None and target.rtt < 1


def test_icmp_auto_works_whether_or_not_unprivileged_sockets_are_allowed():
    p = probe(targets={"gateway": {"host": "127.0.0.1"}}, icmp="auto")
    assert p._icmp_socket == icmp_socket_available()
    assert p.run().targets["gateway"].up


def test_icmp_socket_mode_reports_rather_than_raises():
    p = probe(targets={"gateway": {"host": "127.0.0.1"}}, icmp="socket")
    entry = p.run()
    if icmp_socket_available():
        assert entry.s == "ok"
    else:  # net.ipv4.ping_group_range forbids it here: a clear reason, not a traceback
        assert (entry.s, entry.c) == ("error", "no_answer")
        assert "denied" in entry.m.lower() or "not permitted" in entry.m.lower()


def test_interfaces():
    entry = probe(targets={"gateway": {"host": "127.0.0.1"}}, icmp="command", interfaces=["lo", "nosuch9"]).run()
    assert entry.ifaces == {"lo": True, "nosuch9": False}
    assert (entry.s, entry.c) == ("warn", "interface_down")


def test_unknown_host_is_down_not_an_exception():
    entry = probe(targets={"district": {"host": "no-such-host.invalid", "port": 443}}).run()
    assert entry.s == "error" and not entry.targets["district"].up


def test_entry_is_valid_on_the_wire(tcp_target):
    entry = probe(targets={"district": {"host": "127.0.0.1", "port": tcp_target.port}}, interfaces=["lo"]).run()
    report = wire.Report(v=1, kab="a", kec="b", kit="c", ts=1.0, boot="00000000", seq=1, hb=60, p={"link": entry})
    assert wire.decode_report(wire.encode(report, compress=True)).p["link"] == entry


@pytest.mark.parametrize(
    "text,code,ok,rtt",
    [
        ("64 bytes from 127.0.0.1: icmp_seq=1 ttl=64 time=0.218 ms\n", 0, True, 0.000218),
        ("Reply from 10.0.0.1: bytes=32 time=3ms TTL=128\n", 0, True, 0.003),
        ("Reply from 10.0.0.1: bytes=32 time<1ms TTL=128\n", 0, True, 0.001),
        ("Balasan dari 10.0.0.1: byte=32 waktu=12ms TTL=57\n", 0, True, 0.012),
        ("Reply from 10.0.0.9: Destination host unreachable.\n", 0, False, None),  # Windows says 0 here
        ("Request timed out.\n", 1, False, None),
        ("1 packets transmitted, 0 received, 100% packet loss\n", 1, False, None),
    ],
)
def test_ping_output_parsing(text, code, ok, rtt):
    attempt = parse_ping_output(text, code)
    assert attempt.ok is ok
    assert attempt.rtt == pytest.approx(rtt) if rtt else attempt.rtt is None


def test_median_of_round_trips():
    assert median([0.3]) == 0.3
    assert median([0.3, 0.1, 0.2]) == 0.2
    assert median([0.4, 0.1, 0.3, 0.2]) == 0.25
