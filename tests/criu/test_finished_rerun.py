"""A job that ended with status 0, run again with --resume-if-possible (or requeued by Slurm after its end),
starts its command afresh: restoring an older image of a finished job would run finished work again."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.criu.harness import PROGS, hpcckpt, job_pid, kill_everything, wait_for

COUNTER = str(PROGS / "counter.py")


@pytest.mark.criu
def test_finished_job_starts_afresh_and_a_killed_one_is_restored(work: Path) -> None:
    first = hpcckpt(["run", "--job-id", "done-once", "--interval", "1", "--", sys.executable, COUNTER, "40", "0.05"],
                    work, "first", work / "store")
    assert first.wait(120) == 0, first.err.read_text()[-2000:]
    assert first.events("checkpoint.committed"), "the job ended before its first checkpoint"
    again = hpcckpt(["run", "--job-id", "done-once", "--resume-if-possible", "--interval", "1", "--",
                     sys.executable, COUNTER, "5", "0.01"], work, "again", work / "store")
    assert again.wait(120) == 0, again.err.read_text()[-2000:]
    assert again.events("runner.finished_before") and not again.events("resume.restored")
    assert again.lines() == [str(i) for i in range(5)]  # the command, from its start

    # A job killed while it ran (no end of its own) is restored by the same command line.
    killed = hpcckpt(["run", "--job-id", "killed-once", "--interval", "1", "--", sys.executable, COUNTER, "400",
                      "0.05"], work, "killed", work / "store")
    pid = job_pid("killed-once")
    wait_for(lambda: killed.events("checkpoint.committed"), 60, "a checkpoint")
    kill_everything(killed, pid)
    back = hpcckpt(["run", "--job-id", "killed-once", "--resume-if-possible", "--", sys.executable, COUNTER, "400",
                    "0.05"], work, "back", work / "store")
    wait_for(lambda: back.events("resume.restored"), 60, "the restore")
    assert not back.events("runner.finished_before")
    back.proc.kill()
    back.wait(30)
