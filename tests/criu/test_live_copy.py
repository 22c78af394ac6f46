"""Issue 17 on real CRIU: one live copy per job, the job dies with its runner, a finished job is not
resumed by mistake, and a resume keeps the job's run options."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from hpcckpt.criu import procinfo
from tests.criu.harness import PROGS, Cmd, gone, hpcckpt, job_pid, wait_for

pytestmark = [pytest.mark.criu]
COUNTER = str(PROGS / "counter.py")
FILECOUNTER = str(PROGS / "filecounter.py")


def committed(cmd: Cmd) -> list[dict[str, object]]:
    return cmd.events("checkpoint.committed")


def counter(work: Path, job: str, tag: str, *extra: str, limit: str = "100000") -> Cmd:
    return hpcckpt(["run", "--job-id", job, *extra, "--", sys.executable, COUNTER, limit, "0.05"], work, tag,
                   work / "store")


def test_second_run_of_a_running_job_is_refused(work: Path) -> None:
    first = counter(work, "live", "first", "--interval", "1000")
    pid = job_pid("live")
    second = counter(work, "live", "second", "--interval", "1000")
    assert second.wait(60) == 15
    err = second.err.read_text()
    assert "already running" in err and f"runner pid {first.proc.pid}" in err
    assert second.lines() == []
    # The first one was not disturbed: it still runs, and a checkpoint goes into its own list.
    assert first.proc.poll() is None and not gone(pid)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(60) == 85


def test_job_dies_with_its_runner_and_a_resume_takes_over_with_the_same_interval(work: Path) -> None:
    """kill -9 of the runner ends the job; resume (no --interval) takes over and checkpoints every 2 s again.

    The job writes to a file, not to the runner's pipe: a job writing to stdout would die of the broken
    pipe anyway, and would prove nothing.
    """
    out = work / "count.txt"
    run = hpcckpt(["run", "--job-id", "orphan", "--interval", "2", "--", sys.executable, FILECOUNTER, str(out),
                   "0.05"], work, "run", work / "store")
    pid = job_pid("orphan")
    wait_for(lambda: len(committed(run)) >= 1, 60, "a checkpoint")
    tree = procinfo.tree_pids(pid)
    run.proc.kill()
    run.proc.wait(10)
    wait_for(lambda: all(gone(p) for p in tree), 30, "the job to die with its runner")

    res = hpcckpt(["resume", "orphan"], work, "resume", work / "store")
    rpid = job_pid("orphan", timeout=60)
    assert res.events("lease.taken_over"), "the dead runner's lease was not taken over"
    # The run's --interval 2 holds after the resume (the default would be an hour).
    wait_for(lambda: len(committed(res)) >= 1, 60, "a checkpoint after the resume")
    intervals = {e.get("interval") for e in res.events("runner.interval")}
    assert intervals == {2}, intervals

    rtree = procinfo.tree_pids(rpid)
    res.proc.kill()
    res.proc.wait(10)
    wait_for(lambda: all(gone(p) for p in rtree), 30, "the resumed job to die with its runner")


def test_resume_of_a_job_that_ended_needs_force(work: Path) -> None:
    run = counter(work, "done", "run", "--interval", "1", limit="80")
    assert run.wait(120) == 0
    assert committed(run), "the job ended before its first checkpoint"
    again = hpcckpt(["resume", "done"], work, "again", work / "store")
    assert again.wait(60) == 16
    err = again.err.read_text()
    assert "ended on its own" in err and "status 0" in err and "--force" in err
    assert again.lines() == []

    forced = hpcckpt(["resume", "done", "--force"], work, "forced", work / "store")
    assert forced.wait(120) == 0
    lines = [int(x) for x in forced.lines()]
    assert lines and lines[0] > 0 and lines[-1] == 79

