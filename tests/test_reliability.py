"""Faults survived with real processes: broker restarts, kill -9, a full or read-only disk,
clock jumps. Every wait is a condition with a deadline; the figures feed docs/reliability.md."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import wire
from collector.devbroker import Mosquitto
from conftest import AgentProcess, wait_for, write_agent_config
from test_alerts import SmtpServer, subjects
from test_usb_probe import copy_tree, unplug

KEC = ["dedai", "serawai", "sepauk"]


def queued_seqs(agent: AgentProcess) -> list[int]:
    return [int(n) for n in re.findall(r"report (\d+) queued", agent.log())]


def boot_of(agent: AgentProcess) -> str:
    return re.findall(r"agent ([0-9a-f]+) starting", agent.log())[-1]


def ledger(collector, kit: wire.KitId) -> dict[str, list[list[int]]]:
    return collector.store.ledger(kit)


def complete(collector, kit: wire.KitId, boot: str, last: int) -> bool:
    return ledger(collector, kit).get(boot) == [[1, last]]


def covers(ranges: list[list[int]] | None, last: int) -> bool:
    """One gap-free run from 1 to at least `last`."""
    return bool(ranges) and len(ranges) == 1 and ranges[0][0] == 1 and ranges[0][1] >= last


def test_broker_restarted_five_times_loses_nothing(tmp_path, collector_factory, agent_process, figures):
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    try:
        collector = collector_factory(broker)
        agents = {}
        for kec in KEC:
            cfg = write_agent_config(tmp_path / f"{kec}.yaml", broker, tmp_path / f"state-{kec}",
                                     kit={"kabupaten": "sintang", "kecamatan": kec, "id": "kit-1"})
            agents[kec] = agent_process(cfg)
        wait_for(lambda: all(len(queued_seqs(a)) >= 2 for a in agents.values()), timeout=20, what="reports")
        for restart in range(5):
            broker.stop()
            marks = {kec: max(queued_seqs(a)) for kec, a in agents.items()}
            wait_for(lambda: all(max(queued_seqs(agents[k])) >= marks[k] + 2 for k in KEC), timeout=20,
                     what=f"reports queued while the broker is down ({restart + 1})")
            broker.start()
            wait_for(lambda: all(f"(connect #{restart + 2})" in a.log() for a in agents.values()), timeout=30,
                     what=f"every agent to reconnect ({restart + 1})")
        finals = {}
        for kec, agent in agents.items():
            assert agent.stop(signal.SIGTERM) == 0
            finals[kec] = (boot_of(agent), max(queued_seqs(agent)))
        for kec, (boot, last) in finals.items():
            kit = wire.KitId("sintang", kec, "kit-1")
            wait_for(lambda: complete(collector, kit, boot, last), timeout=30, what=f"every report of {kec}")
        sent = sum(last for _, last in finals.values())
        received = sum(collector.fleet.get(wire.KitId("sintang", k, "kit-1")).reports for k in KEC)
        figures.update(broker_restarts=5, agents=len(KEC), reports_sent=sent, reports_received=received,
                       reports_lost=sent - received)
        assert received == sent
    finally:
        broker.stop()


def test_agent_killed_repeatedly_no_report_counted_twice(tmp_path, broker, collector_factory, figures):
    collector = collector_factory(broker)
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state")
    kit = wire.KitId("sintang", "dedai", "kit-1")
    runs = []
    for n in range(6):
        agent = AgentProcess(cfg, tmp_path / f"agent-{n}.log").start()
        # kill it while it is writing its queue: as soon as it has queued a few reports
        wait_for(lambda: len(queued_seqs(agent)) >= 2 + n % 3, timeout=20, what="reports queued")
        agent.kill()
        runs.append((boot_of(agent), max(queued_seqs(agent))))
    agent = AgentProcess(cfg, tmp_path / "agent-last.log").start()
    wait_for(lambda: len(queued_seqs(agent)) >= 2, timeout=20, what="the last run's reports")
    # every report any run confirmed as queued reaches the collector, possibly via a later run
    for boot, last in runs:
        wait_for(lambda: covers(ledger(collector, kit).get(boot), last), timeout=30,
                 what=f"the backlog of run {boot}")
    agent.stop()
    state = collector.fleet.get(kit)
    unique = sum(r[1] - r[0] + 1 for ranges in ledger(collector, kit).values() for r in ranges)
    figures.update(agent_kills=len(runs), reports_received=state.reports, duplicates_dropped=state.duplicates,
                   unique_reports=unique)
    assert state.reports == unique, "duplicates are recognised by boot id and sequence, never counted"


def test_collector_killed_mid_incident_restores_state_without_duplicate_email(tmp_path, broker, collector_process,
                                                                             agent_process, figures):
    smtp = SmtpServer()
    smtp.start()
    try:
        tree = copy_tree("all-present", tmp_path)
        alerts = {"smtp": {"host": "127.0.0.1", "port": smtp.port, "security": "none", "timeout": 5},
                  "recipients": {"everywhere": ["it@disdukcapil.example"]}, "digest_window": 0,
                  "evaluate_every": 0.2, "kit_down": {"hold": 1, "recover": 1}}
        collector = collector_process(broker, fleet={"required_devices": ["fingerprint"]}, alerts=alerts,
                                      inventory={"sintang": {"kecamatan": {"dedai": {"kits": ["kit-1"]}}}})
        config = {"paths": {"sysfs": str(tree)}, "heartbeat": 1,
                  "probes": {"fingerprint": {"ids": ["05ba:000a"], "interval": 0.3, "timeout": 0.3}}}
        cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state", **config)
        agent = agent_process(cfg)
        kit_url = "/api/kits/sintang/dedai/kit-1/events"
        wait_for(lambda: any(k["ready"] for k in collector.api("/api/fleet")["kits"]), timeout=20, what="ready")
        unplug(tree, "1-1.1")
        wait_for(lambda: subjects(smtp, "it@disdukcapil.example"), timeout=20, what="the down email")
        wait_for(lambda: re.search(r"^ektp_collector_emails_sent_total 1(\.0)?$", collector.metrics(), re.M),
                 timeout=10, what="the email marked as sent")
        collector.kill()  # SIGKILL mid-incident
        mark = max(queued_seqs(agent))
        wait_for(lambda: max(queued_seqs(agent)) >= mark + 3, timeout=20, what="reports while the collector is dead")
        restarted = collector_process(broker)
        kit = restarted.api("/api/fleet")["kits"][0]
        assert not kit["ready"] and kit["not_ready_because"] == ["fingerprint"], "state restored"
        last = max(queued_seqs(agent))
        boot = boot_of(agent)
        wait_for(lambda: covers(restarted.api(kit_url)["ledger"].get(boot), last), timeout=30,
                 what="the reports the broker queued while the collector was dead")
        # the alert is still open after the restart: no second email for the same incident
        time_limit = time.monotonic() + 3
        wait_for(lambda: time.monotonic() > time_limit, timeout=5, what="three alert evaluations")
        figures.update(collector_kills=1, emails_for_one_incident=len(subjects(smtp, "it@disdukcapil.example")))
        assert subjects(smtp, "it@disdukcapil.example") == [
            "[e-KTP] Kec. Dedai kit-1: pemindai sidik jari tidak terdeteksi"]
    finally:
        smtp.stop()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"this test mounts a small tmpfs and needs root: {done.stderr}"


def _fill(path: Path) -> None:
    with open(path / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_state_dir_full_or_read_only(tmp_path, broker, recorder_factory, agent_process, fault, figures):
    """A full disk while running, or a state directory read-only from the start (a remount with
    the queue open is refused by the kernel): live reports go on, the log and the report say
    why, and the queue returns to disk when it can."""
    state = tmp_path / "state"
    _mount_tmpfs(state, "2m")
    agent = None
    try:
        rec = recorder_factory(broker)
        cfg = write_agent_config(tmp_path / "a.yaml", broker, state)
        if fault == "read_only":
            subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        agent = agent_process(cfg)
        if fault == "disk_full":
            wait_for(lambda: len(rec.reports()) >= 2, timeout=20, what="reports with a healthy disk")
            _fill(state)
        troubled = wait_for(lambda: [r for r in rec.reports() if r.q.problem == fault], timeout=30,
                            what=f"a report saying {fault}")
        seq = troubled[0].seq
        wait_for(lambda: max(r.seq for r in rec.reports()) >= seq + 3, timeout=20, what="live reports go on")
        assert "cannot write the report queue" in agent.log()
        if fault == "disk_full":
            (state / "filler").unlink()
        else:
            subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
        wait_for(lambda: [r for r in rec.reports() if r.seq > seq + 3 and r.q.problem == ""], timeout=40,
                 what="the queue back on disk")
        assert "writable again" in agent.log()
        assert (state / "outbox.sqlite").exists()
        seqs = sorted(r.seq for r in rec.reports())
        figures.update(fault=fault, reports=len(seqs), gaps=max(seqs) - len(set(seqs)))
        assert seqs == list(range(1, max(seqs) + 1)), "no report lost while the disk refused writes"
    finally:
        if agent is not None and agent.proc is not None:
            agent.stop()
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


@pytest.mark.parametrize("jump", ["+6h", "-6h"])
def test_clock_jumps_on_the_kit_pc(tmp_path, broker, collector_factory, jump, figures):
    """The kit's clock is hours off (libfaketime); the collector judges by its own clock."""
    collector = collector_factory(broker, fleet={"required_devices": []})
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state")
    log = open(tmp_path / "agent.log", "wb")
    # only the wall clock jumps, as on a PC whose clock is set wrong; its monotonic clock does not
    env = {**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    proc = subprocess.Popen(["faketime", "-f", jump, sys.executable, "-m", "agent", "run", "-c", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent, env=env,
                            start_new_session=True)
    try:
        kit = wire.KitId("sintang", "dedai", "kit-1")
        wait_for(lambda: collector.fleet.get(kit) and collector.fleet.get(kit).reports >= 3, timeout=20,
                 what="reports from the shifted clock")
        state = collector.fleet.get(kit)
        skew = state.last_report_ts - state.last_report
        figures.update(jump=jump, agent_clock_minus_collector_s=round(skew), online=state.online, ready=state.ready)
        assert abs(abs(skew) - 6 * 3600) < 60
        assert state.online and state.ready
        assert collector.ingest.refused["clock"] == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # faketime's child too
        proc.wait(10)
        log.close()


def test_long_outage_backlog_in_order_bound_honoured_drops_exported(tmp_path, collector_factory, agent_process,
                                                                  figures):
    """The broker is away for a long stretch (shortened: a tiny queue fills in seconds); after it
    returns the backlog arrives in order, no more than the bound was kept, and the drops reach
    the collector's metrics."""
    from conftest import http_get

    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    collector = collector_factory(broker)  # its session, kept by the broker, outlives the outage
    broker.stop()
    cfg = write_agent_config(tmp_path / "a.yaml", broker, tmp_path / "state", queue={"max_size": "2KB"})
    agent = agent_process(cfg)
    wait_for(lambda: "dropping the oldest reports" in agent.log(), timeout=40, what="the queue to overflow")
    broker.start()
    try:
        kit = wire.KitId("sintang", "dedai", "kit-1")
        wait_for(lambda: collector.fleet.get(kit) and collector.fleet.get(kit).dropped > 0 and
                 collector.fleet.get(kit).replayed > 0, timeout=30, what="the backlog and the drop count")
        boot = boot_of(agent)
        ranges = ledger(collector, kit)[boot]
        first_kept = ranges[0][0]
        _, body = http_get(f"http://127.0.0.1:{collector.port}/metrics")
        line = [ln for ln in body.decode().splitlines() if ln.startswith("ektp_agent_dropped_reports_total{")][0]
        dropped = float(line.rsplit(" ", 1)[1])
        figures.update(queue_bound_bytes=2048, dropped=int(dropped), first_seq_kept=first_kept,
                       backlog_received=collector.fleet.get(kit).replayed)
        assert first_kept > 1 and dropped >= first_kept - 1, "the oldest were dropped and counted"
        assert len(ranges) == 1, "from the oldest kept on, nothing is missing"
    finally:
        broker.stop()
