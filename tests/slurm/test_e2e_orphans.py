"""End to end on the real cluster: a restored job stays inside its Slurm step, and scancel ends all of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster
from tests.slurm.e2e_helpers import (
    Counter,
    job_processes,
    outside_step,
    parse_output,
    wait_committed,
    wait_for,
    wait_restarted,
)

pytestmark = [pytest.mark.slurm, pytest.mark.criu, pytest.mark.slow]


def test_scancel_after_resume_leaves_no_process(cluster: SlurmCluster, tmp_path: Path) -> None:
    counter = Counter(tmp_path, steps=300, delay=0.3, interval=2)
    job = cluster.sbatch(counter.script("--requeue"))
    cluster.wait_state(job, ["RUNNING"], 60)
    wait_committed(cluster, job, 1)
    cluster.cmd(["scancel", "--batch", "--signal=USR1", job])  # final checkpoint, exit 85, requeued
    wait_restarted(cluster, job, 1)
    wait_for(lambda: bool(parse_output(counter.output(job)).restored_from), 60, "the restore")
    pids = job_processes(cluster, job)
    assert len(pids) >= 2, f"the runner and the restored workload, found {pids}"
    assert outside_step(cluster, job, pids) == [], "every process of the job descends from its slurmstepd"

    cluster.cmd(["scancel", job])
    cluster.wait_state(job, ["CANCELLED"], 60)
    wait_for(lambda: not job_processes(cluster, job), 30, f"every process of job {job} to end")
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
