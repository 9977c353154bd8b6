"""The agent process against a real Mosquitto: presence, change reports, store-and-forward."""

import re
import signal
import time

import pytest

from collector.devbroker import Mosquitto, free_port
from conftest import wait_for, write_agent_config


def reports_by_seq(recorder):
    return {r.seq: r for r in recorder.reports()}


def test_birth_is_retained_and_describes_the_agent(tmp_path, broker, recorder_factory, agent_process):
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state")
    agent = agent_process(cfg)
    first = recorder_factory(broker)
    wait_for(lambda: first.reports(), what="a first report")
    late = recorder_factory(broker)  # subscribes after the birth: sees it only if retained
    message = wait_for(lambda: late.of("status"), what="the retained status")[0]
    assert message.retain
    status = message.decode()
    assert (status.state, status.connects, status.hb) == ("online", 1, 1)
    assert status.agent and status.host and status.os
    assert status.boot == first.reports()[0].boot
    assert agent.proc.poll() is None


def test_clean_stop_says_offline(tmp_path, broker, recorder_factory, agent_process):
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state")
    rec = recorder_factory(broker)
    agent = agent_process(cfg)
    wait_for(lambda: rec.reports(), what="a first report")
    assert agent.stop(signal.SIGTERM) == 0
    status = wait_for(lambda: [s for s in rec.statuses() if s.state == "offline"], what="offline status")[0]
    assert status.reason == "shutdown"


@pytest.mark.parametrize("protocol,will_delay", [("5", 2), ("3.1.1", 0)])
def test_last_will_after_sigkill(tmp_path, broker, recorder_factory, agent_process, protocol, will_delay):
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state",
                             broker={"protocol": protocol, "will_delay": will_delay})
    rec = recorder_factory(broker)
    agent = agent_process(cfg)
    wait_for(lambda: [s for s in rec.statuses() if s.state == "online"], what="birth")
    killed = time.monotonic()
    agent.kill()
    wait_for(lambda: [s for s in rec.statuses() if s.state == "offline"], timeout=will_delay + 10, what="Last Will")
    offline = [m for m in rec.of("status") if m.decode().state == "offline"][0]
    assert offline.decode().reason == "lost"
    if will_delay:
        # a short blip must not mark the kit offline: the will waits for its delay
        assert offline.received - killed >= will_delay - 0.5
    # the will is retained, so a dashboard that starts later still sees the kit offline
    late = recorder_factory(broker)
    assert wait_for(lambda: late.statuses(), what="retained will")[0].state == "offline"


def test_restart_gives_new_boot_and_fresh_birth(tmp_path, broker, recorder_factory, agent_process):
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state")
    rec = recorder_factory(broker)
    first = agent_process(cfg)
    wait_for(lambda: rec.reports(), what="first report")
    first.kill()
    agent_process(cfg)
    births = wait_for(lambda: [s for s in rec.statuses() if s.state == "online"][1:] and
                      [s for s in rec.statuses() if s.state == "online"], what="second birth")
    assert births[0].boot != births[1].boot
    second_boot = [r for r in wait_for(lambda: [r for r in rec.reports() if r.boot == births[1].boot],
                                       what="report of the new boot")]
    assert second_boot[0].seq == 1


def test_state_change_published_within_two_seconds(tmp_path, broker, recorder_factory, agent_process, tcp_target):
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state", target_port=tcp_target.port,
                             heartbeat=60)
    rec = recorder_factory(broker)
    agent_process(cfg)
    wait_for(lambda: [r for r in rec.reports() if r.p["link"].s == "ok"], what="link up")
    assert len(rec.reports()) == 1, "heartbeat is 60 s: only the first report so far"
    tcp_target.close()
    cut = time.monotonic()
    wait_for(lambda: [m for m in rec.of("report") if m.decode().p["link"].s == "error"], timeout=5,
             what="link-down report")
    down = [m for m in rec.of("report") if m.decode().p["link"].s == "error"][0]
    assert down.received - cut <= 2.0
    report = down.decode()
    assert report.p["link"].c == "no_answer"
    assert report.p["link"].targets["district"].up is False
    tcp_target.open()
    wait_for(lambda: rec.reports()[-1].p["link"].s == "ok", timeout=5, what="link back up")


def test_backlog_replayed_in_order_after_broker_restart(tmp_path, recorder_factory, agent_process):
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    try:
        cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state")
        rec = recorder_factory(broker, session="recorder-replay")
        agent = agent_process(cfg)
        wait_for(lambda: len(rec.reports()) >= 3, what="three live reports")
        broker.stop()
        queued_before = len(re.findall(r"report \d+ queued", agent.log()))
        wait_for(lambda: len(re.findall(r"report \d+ queued", agent.log())) >= queued_before + 5, timeout=15,
                 what="reports queued while the broker is down")
        broker.start()
        last = int(re.findall(r"report (\d+) queued", agent.log())[-1])

        def complete():
            seqs = reports_by_seq(rec)
            return seqs and max(seqs) > last + 2 and set(range(1, max(seqs) + 1)) <= set(seqs)

        wait_for(complete, timeout=30, what="every sequence number")
        reports = rec.reports()
        seqs = [r.seq for r in reports]
        assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), "no gaps"
        replayed = [r.seq for r in reports if r.replay]
        assert len(replayed) >= 5, "reports made during the outage are flagged as replayed"
        assert replayed == sorted(replayed), "the backlog arrives in order"
        assert all(r.q.queued >= 0 for r in reports)
        assert len({r.boot for r in reports}) == 1
    finally:
        broker.stop()


def test_queue_bound_drops_oldest_and_reports_the_count(tmp_path, recorder_factory, agent_process):
    port = free_port()
    broker = Mosquitto(tmp_path / "broker", port=port)
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state", queue={"max_size": "2KB"},
                             broker={"compress": True})
    agent = agent_process(cfg)  # the broker is not there yet
    wait_for(lambda: "dropping the oldest reports" in agent.log(), timeout=30, what="the queue to overflow")
    broker.start()
    try:
        rec = recorder_factory(broker)
        wait_for(lambda: rec.reports() and rec.reports()[-1].q.dropped > 0 and not rec.reports()[-1].replay,
                 timeout=30, what="a live report after the backlog")
        reports = rec.reports()
        assert min(r.seq for r in reports) > 1, "the oldest were dropped"
        backlog = [r for r in reports if r.replay]
        assert backlog and all(b.seq < a.seq for b, a in zip(backlog, backlog[1:]))
        total = sum(len(m.payload) + 48 for m in rec.of("report") if m.decode().replay)
        assert total <= 2048 + 200, "no more was kept than the bound allows"
        assert reports[-1].q.dropped >= min(r.seq for r in reports) - 1
    finally:
        broker.stop()


def test_backlog_of_a_killed_agent_is_sent_by_the_next_one(tmp_path, recorder_factory, agent_process):
    """Reports queued while the broker was away survive kill -9 and go out after restart."""
    broker = Mosquitto(tmp_path / "broker")
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state")
    first = agent_process(cfg)  # no broker yet
    wait_for(lambda: len(re.findall(r"report \d+ queued", first.log())) >= 4, timeout=15, what="queued reports")
    first.kill()
    queued = [int(n) for n in re.findall(r"report (\d+) queued", first.log())]
    broker.start()
    try:
        rec = recorder_factory(broker)
        second = agent_process(cfg)
        old_boot = re.search(r"agent ([0-9a-f]+) starting", first.log()).group(1)
        wait_for(lambda: {r.seq for r in rec.reports() if r.boot == old_boot} >= set(queued), timeout=20,
                 what="the first agent's backlog")
        old = [r for r in rec.reports() if r.boot == old_boot]
        assert all(r.replay for r in old)
        assert [r.seq for r in old] == sorted(r.seq for r in old)
        assert second.proc.poll() is None
    finally:
        broker.stop()


def test_second_agent_on_the_same_state_dir_refuses_to_start(tmp_path, broker, agent_process):
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state")
    first = agent_process(cfg)
    wait_for(lambda: "connected to" in first.log(), what="the first agent")
    second = agent_process(cfg)
    assert second.proc.wait(20) == 1
    assert "another ektp-agent is already running" in second.log()
    assert first.proc.poll() is None


def test_report_refused_by_the_broker_stays_queued(tmp_path, recorder_factory, agent_process):
    """An ACL that denies the kit's topic answers PUBACK 'Not authorized' (MQTT 5): the agent
    keeps the report and says so, instead of deleting it as if delivered."""
    acl = tmp_path / "acl"
    acl.write_text("topic read ektp/v1/#\ntopic write ektp/v1/+/+/+/status\n")
    broker = Mosquitto(tmp_path / "broker", extra=f"acl_file {acl}\n").start()
    try:
        cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state")
        agent = agent_process(cfg)
        wait_for(lambda: "the broker refused a report" in agent.log(), timeout=20, what="the refusal in the log")
        assert "Not authorized" in agent.log()
        from agent.outbox import Outbox

        queued = Outbox(tmp_path / "state" / "outbox.sqlite", 10**7).count
        assert queued >= 1, "the refused report is still queued"
    finally:
        broker.stop()
