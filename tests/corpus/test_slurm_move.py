"""Every corpus case on the real Slurm test cluster: its node fails after 2 checkpoints; it resumes on another one.

Each case is a batch job of its own, ``sbatch --requeue`` running ``exec hpcckpt run --interval 1 -- CMD`` with
no per-job policy. All are submitted at once (the cluster runs one job a node, three at a time). Once a job has 2
committed checkpoints its node fails under it (slurmd, the step daemon and every process of the job SIGKILLed,
the node marked down); Slurm requeues the job, the EpilogSlurmctld keeps the dead node out (the test then brings
the node back, for the other jobs), and the requeued job restores its latest image on another node and runs to its
end. Each job's
outputs must be the bytes of an uninterrupted run, and its output file must show the restored run going on from
its checkpoint, not from step 0.

The test cluster's nodes share this host's ``/tmp`` and ``/dev/shm``, so what a job keeps there is still there
after the move; test_node_local_files.py resumes the cases that keep such files where they are gone.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.corpus.cases import CASES, Built, Case, differing_outputs, job_env
from tests.corpus.conftest import require
from tests.slurm.cluster import SlurmCluster
from tests.slurm.e2e_helpers import catalog_rows, fail_node

pytestmark = [pytest.mark.slurm, pytest.mark.criu, pytest.mark.mpi, pytest.mark.slow]

# A job that is not done within this many seconds of its submission fails the test.
PER_JOB_S = 240
# Slurm holds a requeued job ~120 s (BeginTime); the EpilogSlurmctld lifts that hold (policy backoff 0), and
# should it not within this many seconds, the test does, so a slow hook costs time, not the test.
RELEASE_AFTER_S = 20


STEP = re.compile(r"step (\d+)")


def segments(path: Path) -> list[list[int]]:
    """The steps each run printed into the job's output file: the file cut at each ``resume.restored`` event.

    The job's stdout and hpcckpt's log share the file, and a log line can land in the middle of a line of the
    job's (``step 51{"ts": ...}``), so both are looked for anywhere on a line.
    """
    runs: list[list[int]] = [[]]
    for line in path.read_text(errors="replace").splitlines():
        m = STEP.match(line)
        if m:
            runs[-1].append(int(m.group(1)))
        at = line.find('{"ts"')
        if at >= 0:
            try:
                doc = json.loads(line[at:])
            except ValueError:
                continue
            if doc.get("event") == "resume.restored":
                runs.append([])
    return runs


@dataclass
class Mover:
    """One case's batch job and where it is in its run, node failure, move and end."""

    case: Case
    dir: Path
    scratch: Path
    job: str = ""
    first: str = ""  # the node that failed under it
    second: str = ""  # the node it resumed on
    phase: str = "first run"
    submitted: float = 0.0
    held_since: dict[str, float] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.dir / "out"

    def script(self, built: Built) -> str:
        # The test cluster's nodes are named node1..3 but are all this host: mpirun would take its node in
        # SLURM_NODELIST for a remote one and start its ranks there through srun, outside the job. On a real
        # cluster a one-node mpirun finds itself in the list and starts its ranks itself, as here.
        env = {**job_env(self.scratch), "OMPI_MCA_ras": "^slurm", "OMPI_MCA_plm": "^slurm"}
        argv = " ".join(self.case.argv(built, self.out))
        return "\n".join([
            "#!/bin/sh",
            f"#SBATCH --output={self.dir}/%j.out",
            "#SBATCH --open-mode=append",
            f"#SBATCH --chdir={self.dir}",
            "#SBATCH --requeue",
            f"#SBATCH --job-name=corpus-{self.case.name}",
            *(f"export {k}={v}" for k, v in env.items()),
            f"exec hpcckpt run --interval 1 -- {argv}",
            "",
        ])


def _release_if_held(cluster: SlurmCluster, m: Mover, info: dict[str, str]) -> None:
    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
        since = m.held_since.setdefault(info.get("Restarts", "0"), time.monotonic())
        if time.monotonic() - since > RELEASE_AFTER_S:
            cluster.release(m.job)


def _tail(m: Mover, size: int = 4000) -> str:
    """The end of the job's Slurm output (hpcckpt's log lines and the job's own), for a failure's message."""
    try:
        return (m.dir / f"{m.job}.out").read_text(errors="replace")[-size:]
    except OSError as exc:
        return f"(no output: {exc})"


def _advance(cluster: SlurmCluster, m: Mover) -> None:
    """Move ``m`` on by one phase if it is ready to; raise AssertionError if it went wrong."""
    info = cluster.show_job(m.job)
    state, restarts = info.get("JobState", ""), int(info.get("Restarts", "0") or 0)
    if state in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY") and not (m.phase == "moving" and restarts == 0):
        raise AssertionError(f"{m.case.name}: job {m.job} ended {state} in its {m.phase}; see {m.dir}; "
                             f"the end of its output:\n{_tail(m)}")
    if m.phase == "first run":
        if state == "COMPLETED":
            raise AssertionError(f"{m.case.name}: job {m.job} ended before 2 checkpoints committed; see {m.dir}")
        if state == "RUNNING" and len(catalog_rows(cluster, m.job)) >= 2:
            m.first = info["NodeList"]
            fail_node(cluster, m.first, m.job)
            m.phase = "moving"
    elif m.phase == "moving":
        # Requeued with the dead node excluded: the node can come back (the other jobs may need it), and
        # this job cannot go there.
        if restarts >= 1 and m.first in info.get("ExcNodeList", ""):
            cluster.revive_node(m.first)
            m.phase = "requeued"
    elif m.phase in ("requeued", "resumed"):
        _release_if_held(cluster, m, info)
        if m.phase == "requeued" and state in ("RUNNING", "COMPLETED"):
            m.second = info["NodeList"]
            assert m.second != m.first, f"{m.case.name}: job {m.job} came back on its failed node {m.first}"
            m.phase = "resumed"
        if m.phase == "resumed" and state == "COMPLETED":
            m.phase = "done"
    if m.phase != "done" and time.monotonic() - m.submitted > PER_JOB_S:
        raise AssertionError(f"{m.case.name}: job {m.job} still in its {m.phase} after {PER_JOB_S} s "
                             f"(state {state}, reason {info.get('Reason')}); see {m.dir}")


def _check(m: Mover, ref: Path) -> list[str]:
    """What is wrong with a finished mover's results (empty: nothing)."""
    runs = segments(m.dir / f"{m.job}.out")
    problems = []
    if len(runs) != 2:
        problems.append(f"{len(runs) - 1} restores in the output, not 1")
    else:
        first, second = runs
        if not first or first[0] != 0:
            problems.append(f"the first run did not start at step 0: {first[:3]}")
        elif not second or not 0 < second[0] <= first[-1] + 1:
            problems.append(f"the restored run began at {second[:1]}; the first run had printed up to {first[-1]}")
        elif second != list(range(second[0], m.case.steps)):
            problems.append("the restored run skipped or repeated steps")
    problems += differing_outputs(m.case, m.out, ref)
    return [f"{m.case.name} (job {m.job}, {m.first} -> {m.second}): {p}" for p in problems]


def test_every_case_resumes_on_another_node_after_its_node_fails(
    cluster: SlurmCluster, built: Built, reference: Callable[[Case], Path], tmp_path: Path, criu_ok: None
) -> None:
    for case in CASES:
        require(case)
    refs = {c.name: reference(c) for c in CASES}
    movers = []
    try:
        for case in CASES:
            d = tmp_path / case.name
            (d / "out").mkdir(parents=True)
            movers.append(Mover(case, d, Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))))
        for m in movers:
            m.job = cluster.sbatch(m.script(built))
            m.submitted = time.monotonic()
        t0 = time.monotonic()
        while any(m.phase != "done" for m in movers):
            for m in movers:
                if m.phase != "done":
                    _advance(cluster, m)
            time.sleep(0.5)
        print(f"corpus on Slurm: {len(movers)} jobs moved and done in {time.monotonic() - t0:.0f} s")
        problems = [p for m in movers for p in _check(m, refs[m.case.name])]
        assert problems == []
    finally:
        for m in movers:
            shutil.rmtree(m.scratch, ignore_errors=True)
