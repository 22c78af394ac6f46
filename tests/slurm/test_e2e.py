"""End to end on the real cluster: periodic checkpoints in a batch job, and preemption.

The workload is :class:`tests.slurm.e2e_helpers.Counter`: each restored run
must go on at the step its image held + 1, and the job must end with the
result of an uninterrupted run (see :func:`~tests.slurm.e2e_helpers.assert_resumed`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from hpcckpt.image import verify_image
from tests.slurm.cluster import SlurmCluster
from tests.slurm.e2e_helpers import (
    Counter,
    assert_resumed,
    catalog_rows,
    image_path,
    parse_output,
    wait_committed,
    wait_done,
    wait_restarted,
)

pytestmark = [pytest.mark.slurm, pytest.mark.criu, pytest.mark.slow]


def _ts(event: dict[str, object]) -> float:
    return dt.datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()


def test_periodic_checkpoints_carry_job_id_and_node(cluster: SlurmCluster, tmp_path: Path) -> None:
    counter = Counter(tmp_path, steps=16, interval=2)
    job = cluster.sbatch(counter.script("--requeue"))
    info = cluster.wait_state(job, ["COMPLETED"], 120)
    node = info["NodeList"]
    assert int(counter.result.read_text()) == counter.expected
    rows = catalog_rows(cluster, job)
    assert len(rows) >= 2, f"a {16 * 0.5:.0f} s job with a 2 s interval committed {len(rows)} checkpoints"
    for rec in rows:
        assert rec.job_id == job  # type: ignore[attr-defined]
        meta = verify_image(rec.path).meta  # type: ignore[attr-defined]
        assert meta.job_id == job and meta.slurm.get("SLURM_JOB_ID") == job
        assert meta.slurm.get("SLURM_JOB_NODELIST") == node, "the image records the node Slurm gave the job"
        assert rec.node == node, "the catalog row names the Slurm node, not the host"  # type: ignore[attr-defined]
        assert meta.node == node


def test_preempted_job_checkpoints_within_grace_and_resumes_on_another_node(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    # --signal: with preempt_send_user_signal Slurm sends USR1 to the batch shell
    # (hpcckpt run, by exec) at preemption; otherwise SIGTERM comes when GraceTime ends.
    counter = Counter(tmp_path, steps=150, delay=0.3, interval=3)
    victim = cluster.sbatch(counter.script("--requeue", "--partition=low", "--time=10", "--signal=B:USR1@10"))
    first = cluster.wait_state(victim, ["RUNNING"], 60)["NodeList"]
    wait_committed(cluster, victim, 1)
    # The other two nodes run jobs of the high partition, which nothing preempts:
    # the only job the hog can take a node from is the victim.
    fillers = [cluster.sbatch("#!/bin/sh\nsleep 600\n", "--partition=high", f"--output={tmp_path}/filler-%j.out")
               for _ in range(2)]
    for f in fillers:
        cluster.wait_state(f, ["RUNNING"], 60)
    hog = cluster.sbatch("#!/bin/sh\nsleep 600\n", "--partition=high", f"--output={tmp_path}/hog-%j.out")
    assert cluster.wait_state(hog, ["RUNNING"], 90)["NodeList"] == first
    # The victim is requeued; it comes back only once a node frees up, and not on the hog's.
    cluster.cmd(["scancel", fillers[0]])
    info = wait_restarted(cluster, victim, 1)
    assert info["NodeList"] != first and cluster.show_job(hog)["JobState"] == "RUNNING"
    wait_done(cluster, victim, 150)

    runs = parse_output(counter.output(victim))
    starts = assert_resumed(counter, runs, lambda c: image_path(cluster, c))
    # The final checkpoint: taken after SIGTERM, within the partition's GraceTime,
    # and the restore went on from it, exactly where the first run was stopped.
    names = [str(e.get("event")) for e in runs.events]
    pre = runs.events[names.index("runner.preempted")]
    final = [e for e in runs.events[names.index("runner.preempted"):]
             if e.get("event") == "checkpoint.committed" and e.get("final")]
    assert final, "no final checkpoint after the preemption signal"
    assert _ts(final[0]) - _ts(pre) < cluster.grace_time
    assert runs.restored_from[0] == final[0]["ckptid"]
    assert starts[0] == runs.segments[0][-1] + 1, "a final checkpoint loses no step"
    for job in (hog, fillers[1]):
        cluster.cmd(["scancel", job])
