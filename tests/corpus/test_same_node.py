"""Every corpus case under the real CLI: checkpointed, killed with its whole tree, resumed at once on this node.

``hpcckpt run --interval 1`` with no per-job policy; after at least 2 committed checkpoints (as
``hpcckpt list --json`` shows them) the job's processes are stopped, then the runner and all of them get SIGKILL
(a crash), and ``hpcckpt resume`` must take the job to its end with output identical to an uninterrupted run,
going on from its checkpoint (its first step after the resume is past 0 and no later than the step after the
last one the killed run printed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hpcckpt import procinfo
from tests.corpus.cases import CASES, Built, Case, differing_outputs, job_env, scratch_dir, steps_printed
from tests.corpus.conftest import require
from tests.criu.harness import REPO, Cmd, hpcckpt, job_pid, kill_everything, wait_for

pytestmark = [pytest.mark.criu, pytest.mark.slow]


def committed(store: Path, job: str) -> list[int]:
    """The job's committed checkpoints, through the real ``hpcckpt list --json``."""
    env = dict(os.environ, HPCCKPT_STORE=str(store), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "hpcckpt", "list", job, "--json"], env=env, capture_output=True,
                         text=True, timeout=60)
    if res.returncode != 0:
        return []
    return [int(r["ckptid"]) for r in json.loads(res.stdout) if r["status"] == "committed"]


def crash(run: Cmd, pid: int) -> None:
    """The node dies under the job: every process of the job stops at once, then all get SIGKILL.

    Killed one by one, a job's survivors see the others die and react, as no process of a crashed node can:
    mpirun, for one, deletes the shared-memory files of its dead ranks, which the restored ranks map.
    """
    for p in procinfo.tree_pids(pid):
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    kill_everything(run, pid)


def failures(cmd: Cmd) -> str:
    """The warnings and errors a run logged, each once, with CRIU's own lines: for the assertion messages."""
    seen: list[str] = []
    for e in cmd.events():
        if e.get("level") in ("warning", "error"):
            text = f"{e.get('event')}: {e.get('excerpt') or e.get('msg')}"
            if text not in seen:
                seen.append(text)
    return "\n".join(seen)[-3000:]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.mpi] if c.mpi else [])
                                  for c in CASES])
def test_killed_then_resumed_on_same_node_matches_uninterrupted(
    case: Case, built: Built, reference: Callable[[Case], Path], work: Path
) -> None:
    require(case)
    ref = reference(case)
    out, store, job = work / "out", work / "store", f"corpus-{case.name}"
    out.mkdir()
    with scratch_dir() as scratch:
        env = job_env(scratch)
        run = hpcckpt(["run", "--job-id", job, "--interval", "1", "--", *case.argv(built, out)], work, "run", store,
                      extra_env=env)
        try:
            pid = job_pid(job)
            wait_for(lambda: run.proc.poll() is not None or len(committed(store, job)) >= 2, 90,
                     f"2 committed checkpoints of {case.name}", every=0.5)
            assert run.proc.poll() is None, (
                f"{case.name} ended (status {run.proc.returncode}) before 2 checkpoints committed:\n{failures(run)}"
            )
        finally:
            if run.proc.poll() is None:
                crash(run, pid)
        before = steps_printed(run.out.read_text(errors="replace"))
        assert before and before[0] == 0

        res = hpcckpt(["resume", job, "--interval", "1"], work, "resume", store, extra_env=env)
        try:
            status = res.wait(120)
        finally:
            if res.proc.poll() is None:
                res.proc.kill()
        assert status == 0, f"resume of {case.name} ended {status}:\n{failures(res)}"
    after = steps_printed(res.out.read_text(errors="replace"))
    assert after, f"the resumed {case.name} printed no step"
    assert 0 < after[0] <= before[-1] + 1, (
        f"{case.name}: the resumed run began at step {after[0]}; the killed one had printed up to {before[-1]}"
    )
    assert after == list(range(after[0], case.steps)), f"{case.name}: the resumed run skipped or repeated steps"
    assert differing_outputs(case, out, ref) == []
