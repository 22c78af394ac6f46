"""One corpus case through the real CLI on this node: run, 2 checkpoints, a crash, resume, compare."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from hpcckpt.criu import procinfo
from tests.corpus.cases import Built, Case, differing_outputs, job_env, scratch_dir, steps_printed
from tests.criu.harness import REPO, Cmd, hpcckpt, job_pid, kill_everything, wait_for


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
    """The warnings and errors a command logged, each once, with CRIU's own lines: for assertion messages."""
    seen: list[str] = []
    for e in cmd.events():
        if e.get("level") in ("warning", "error"):
            text = f"{e.get('event')}: {e.get('excerpt') or e.get('msg')}"
            if text not in seen:
                seen.append(text)
    # A refusal before anything was logged is said on plain stderr lines.
    seen += [ln for ln in cmd.err.read_text(errors="replace").splitlines() if ln and not ln.startswith("{")]
    return "\n".join(seen)[-3000:]


def _end(cmd: Cmd, job: str) -> None:
    """Stop a command still running at the end of a test, with the job it runs."""
    if cmd.proc.poll() is not None:
        return
    try:
        pid = job_pid(job, timeout=5)
    except AssertionError:
        cmd.proc.kill()
        cmd.proc.wait(10)
        return
    crash(cmd, pid)


def kill_and_resume(case: Case, built: Built, ref: Path, work: Path, *, fresh_scratch: bool = False) -> None:
    """Run ``case`` under ``hpcckpt run --interval 1``, crash it after 2 committed checkpoints, resume it at once
    with ``hpcckpt resume``; assert it went on from its checkpoint and ended with the uninterrupted run's output.

    ``fresh_scratch``: the job's node-local scratch (TMPDIR, OpenMPI's shared-memory files) is empty at the
    restore, as on another node.
    """
    out, store, job = work / "out", work / "store", f"corpus-{case.name}"
    out.mkdir()
    with scratch_dir() as scratch:
        env = job_env(scratch)
        run = hpcckpt(["run", "--job-id", job, "--interval", "1", "--", *case.argv(built, out)], work, "run", store,
                      extra_env=env)
        try:
            job_pid(job)
            wait_for(lambda: run.proc.poll() is not None or len(committed(store, job)) >= 2, 90,
                     f"2 committed checkpoints of {case.name}", every=0.5)
            assert run.proc.poll() is None, (
                f"{case.name} ended (status {run.proc.returncode}) before 2 checkpoints committed:\n{failures(run)}"
            )
        finally:
            _end(run, job)
        before = steps_printed(run.out.read_text(errors="replace"))
        assert before and before[0] == 0
        if fresh_scratch:
            shutil.rmtree(scratch)
            scratch.mkdir(mode=0o700)
            shutil.rmtree(Path("/dev/shm") / f"hpcckpt-{os.getuid()}" / job, ignore_errors=True)

        res = hpcckpt(["resume", job, "--interval", "1"], work, "resume", store, extra_env=env)
        try:
            status = res.wait(120)
        finally:
            _end(res, job)
        assert status == 0, f"resume of {case.name} ended {status}:\n{failures(res)}"
    after = steps_printed(res.out.read_text(errors="replace"))
    assert after, f"the resumed {case.name} printed no step"
    assert 0 < after[0] <= before[-1] + 1, (
        f"{case.name}: the resumed run began at step {after[0]}; the killed one had printed up to {before[-1]}"
    )
    assert after == list(range(after[0], case.steps)), f"{case.name}: the resumed run skipped or repeated steps"
    assert differing_outputs(case, out, ref) == []
