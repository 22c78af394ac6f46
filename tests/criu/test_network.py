"""A job's own network namespace under real CRIU: loopback TCP carried, no port clash, the outside reached,
connections leaving the job closed or skipped as policy says."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from hpcckpt.criu.netplan import Endpoint, classify, parse_tcp_table
from tests.criu.harness import PROGS, Cmd, hpcckpt, job_pid, kill_everything, wait_for

PAIR = str(PROGS / "tcp_pair.py")
OUT = str(PROGS / "tcp_out.py")
PORT = 7777

TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1E61 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1 0
   1: 0100007F:1E61 0100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 102 1 0
   2: 0100007F:A000 0100007F:1E61 01 00000000:00000000 00:00000000 00000000     0        0 103 1 0
   3: 6402000A:B000 0202000C:0050 01 00000000:00000000 00:00000000 00000000     0        0 104 1 0
"""


def test_parse_and_classify() -> None:
    rows = parse_tcp_table(TABLE)
    assert rows[0] == (101, 0x0A, Endpoint("127.0.0.1", 7777), Endpoint("0.0.0.0", 0))
    plan = classify(rows, {101, 102, 103, 104})
    assert sorted(c.inode for c in plan.internal) == [102, 103]
    assert [(c.peer.host, c.peer.port) for c in plan.external] == [("12.0.2.2", 80)]
    assert plan.needs_tcp_established
    # A connection whose other end is not the job's is external even on loopback.
    assert [c.inode for c in classify(rows, {101, 102}).external] == [102]
    assert not classify(rows, {101}).needs_tcp_established  # a listening socket needs no flag


def committed(cmd: Cmd) -> int:
    return len(cmd.events("checkpoint.committed"))


def numbers(cmd: Cmd) -> list[int]:
    return [int(x) for x in cmd.lines() if x.isdigit()]


@pytest.mark.criu
def test_loopback_tcp_job_resumes_at_once_beside_a_job_on_the_same_port(work: Path) -> None:
    """Two jobs hold the same loopback port; one is killed and resumed at once: no clash, the count goes on."""
    other = hpcckpt(["run", "--job-id", "net-b", "--interval", "3600", "--", sys.executable, PAIR, str(PORT),
                     "100000", "0.05"], work, "other", work / "store")
    run = hpcckpt(["run", "--job-id", "net-a", "--interval", "1", "--", sys.executable, PAIR, str(PORT),
                   "100000", "0.05"], work, "run", work / "store")
    other_pid = job_pid("net-b")
    try:
        pid = job_pid("net-a")
        wait_for(lambda: committed(run) >= 2, 60, "two checkpoints of the TCP job")
        kill_everything(run, pid)
        before = numbers(run)
        res = hpcckpt(["resume", "net-a"], work, "resume", work / "store")
        wait_for(lambda: len(numbers(res)) >= 10, 60, "the resumed job to go on")
        after = numbers(res)
        assert after[0] > 0, "restarted from 0 instead of the checkpoint"
        assert after[0] <= before[-1] + 1
        assert after == list(range(after[0], after[0] + len(after))), "numbers lost or repeated over TCP"
        assert numbers(other)[-1] > 0 and other.proc.poll() is None
        kill_everything(res, job_pid("net-a"))
    finally:
        kill_everything(other, other_pid)


@pytest.mark.criu
def test_outside_connection_is_closed_in_the_restored_job(
        work: Path, outside_server: tuple[str, int, list[socket.socket]]) -> None:
    host, port, accepted = outside_server
    run = hpcckpt(["run", "--job-id", "net-out", "--interval", "1", "--", sys.executable, OUT, host, str(port), "0.05"],
                  work, "run", work / "store")
    pid = job_pid("net-out")
    wait_for(lambda: accepted, 30, "the job to reach the outside through its namespace's link")
    wait_for(lambda: committed(run) >= 2, 60, "two checkpoints despite the outside connection")
    warned = run.events("checkpoint.external_connections")
    assert warned and f"{port}" in warned[0]["msg"] and "job.external_connections" in warned[0]["msg"]
    kill_everything(run, pid)
    res = hpcckpt(["resume", "net-out"], work, "resume", work / "store")
    assert res.wait(60) == 0
    out = res.out.read_text()
    assert "closed" in out, out[-500:]
    assert numbers(res) == [] or numbers(res)[0] > 0


@pytest.mark.criu
def test_outside_connection_skips_checkpoints_when_policy_says_so(
        work: Path, outside_server: tuple[str, int, list[socket.socket]]) -> None:
    host, port, _ = outside_server
    pol = work / "skip.yaml"
    pol.write_text("job:\n  external_connections: skip\n")
    run = hpcckpt(["run", "--policy", str(pol), "--job-id", "net-skip", "--interval", "1", "--", sys.executable,
                   OUT, host, str(port), "0.05"], work, "run", work / "store")
    pid = job_pid("net-skip")
    wait_for(lambda: run.events("checkpoint.dump_failed"), 30, "a skipped checkpoint")
    failed = run.events("checkpoint.dump_failed")[0]["msg"]
    assert "job.external_connections" in failed and f"{host}:{port}" in failed
    assert committed(run) == 0
    assert run.proc.poll() is None, "the job must go on running"
    kill_everything(run, pid)


def test_first_error_is_criu_own_first_error_line() -> None:
    from hpcckpt.criu.engine import first_error

    log = ("(00.001) Warn (criu/kerndat.c:1): something harmless\n"
           "(00.012) Error (criu/sk-inet.c:886): inet: Can't bind inet socket (id 17): Address already in use\n"
           "(00.013) Error (criu/cr-restore.c:2001): Restoring FAILED.\n")
    task_line = "     1: Error (criu/files.c:1221): Unable to open fd=3 id=0xc\n"
    assert first_error(task_line) == "Unable to open fd=3 id=0xc"
    assert first_error(log) == "inet: Can't bind inet socket (id 17): Address already in use"
    assert first_error("no errors here\n") == ""


@pytest.mark.criu
def test_failed_restore_names_criu_cause_not_a_pipe_error(work: Path) -> None:
    """On the node's own network, a port taken since the checkpoint makes CRIU fail; the message says so."""
    pol = work / "host.yaml"
    pol.write_text("job:\n  network: host\n")
    with socket.socket() as probe:  # the node's own network: a port nobody holds now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = hpcckpt(["run", "--policy", str(pol), "--job-id", "net-host", "--interval", "1", "--", sys.executable,
                   PAIR, str(port), "100000", "0.05"], work, "run", work / "store")
    pid = job_pid("net-host")
    wait_for(lambda: committed(run) >= 1, 60, "a checkpoint")
    kill_everything(run, pid)
    squatter = socket.socket()
    # The killed pair's connection may linger in TIME_WAIT on this port; a listener still clashes with CRIU's.
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        res = hpcckpt(["resume", "net-host"], work, "resume", work / "store")
        assert res.wait(60) != 0
        err = res.err.read_text()
        headline = next(ln for ln in err.splitlines() if ln.startswith("hpcckpt: error:"))
        assert "Address already in use" in headline, err[-2000:]
        assert "Connection reset" not in headline and "serving the images" not in headline
        assert "log: " not in headline
    finally:
        squatter.close()
