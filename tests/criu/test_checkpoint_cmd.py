"""``hpcckpt checkpoint JOBID [--and-stop]``: a checkpoint on demand, over the runner's control socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpcckpt.exitcodes import EXIT_REQUEUE, EXIT_RUNNER
from tests.criu.harness import PROGS, REPO, hpcckpt, job_pid, wait_for

pytestmark = [pytest.mark.criu]
COUNTER = str(PROGS / "counter.py")


def cli(args: list[str], work: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HPCCKPT_STORE=str(work / "store"), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "hpcckpt", *args], env=env, cwd=work, capture_output=True,
                          text=True, timeout=120)


def test_checkpoint_now_then_and_stop_then_resume(work: Path) -> None:
    # A long interval: every checkpoint here is one asked for.
    run = hpcckpt(["run", "--job-id", "ondemand", "--interval", "1000", "--", sys.executable, COUNTER,
                   "100000", "0.05"], work, "run", work / "store")
    job_pid("ondemand")
    wait_for(lambda: len(run.lines()) >= 5, 30, "the job to count")

    first = cli(["checkpoint", "ondemand", "--json"], work)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["ok"] is True and doc["ckptid"] > 0
    listed = json.loads(cli(["list", "ondemand", "--json"], work).stdout)
    assert [r["ckptid"] for r in listed if r["status"] == "committed"] == [doc["ckptid"]]
    assert run.proc.poll() is None, "a plain checkpoint leaves the job running"
    seen = len(run.lines())
    wait_for(lambda: len(run.lines()) > seen + 3, 30, "the job to go on counting")

    stop = cli(["checkpoint", "ondemand", "--and-stop"], work)
    assert stop.returncode == 0, stop.stderr
    stopped_at = int(stop.stdout.strip().splitlines()[-1])
    assert stopped_at > doc["ckptid"]
    assert run.wait(60) == EXIT_REQUEUE, "--and-stop ends the job with 'checkpointed, requeue me'"
    last = int(run.lines()[-1])

    res = hpcckpt(["resume", "ondemand", "--interval", "1000"], work, "resume", work / "store")
    wait_for(lambda: len(res.lines()) >= 3, 60, "output after the resume")
    res.proc.send_signal(signal.SIGTERM)
    assert res.wait(60) == EXIT_REQUEUE
    assert int(res.lines()[0]) == last + 1, "the job goes on exactly from its --and-stop checkpoint"


def test_checkpoint_of_a_job_with_no_runner_says_so(work: Path) -> None:
    res = cli(["checkpoint", "no-such-job"], work)
    assert res.returncode == EXIT_RUNNER
    assert "no-such-job" in res.stderr
