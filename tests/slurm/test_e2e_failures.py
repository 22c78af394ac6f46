"""End to end on the real cluster: a node dies under a job; a failed job is resubmitted.

Both go on from the latest *periodic* image (nothing could take a final one):
the restored run starts at that image's step + 1 and the job ends with the
result of an uninterrupted run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from tests.slurm.cluster import REPO, SlurmCluster
from tests.slurm.e2e_helpers import (
    Counter,
    assert_resumed,
    catalog_rows,
    fail_node,
    image_path,
    job_processes,
    kill_pids,
    parse_output,
    wait_committed,
    wait_done,
    wait_for,
    wait_restarted,
)

pytestmark = [pytest.mark.slurm, pytest.mark.criu, pytest.mark.slow]


def _latest(cluster: SlurmCluster, job: str) -> int:
    return max(r.ckptid for r in catalog_rows(cluster, job))  # type: ignore[attr-defined]


def test_node_failure_resumes_from_latest_periodic_image_on_another_node(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    counter = Counter(tmp_path, steps=40, interval=2)
    job = cluster.sbatch(counter.script("--requeue"))
    first = cluster.wait_state(job, ["RUNNING"], 60)["NodeList"]
    wait_committed(cluster, job, 2)
    try:
        fail_node(cluster, first, job)
        latest = _latest(cluster, job)  # nothing of the job is left to commit another
        info = wait_restarted(cluster, job, 1)
        assert info["NodeList"] != first
        assert first in info.get("ExcNodeList", ""), "the ctld-epilog keeps the failed node out"
        wait_done(cluster, job, 120)
    finally:
        cluster.revive_node(first)
    runs = parse_output(counter.output(job))
    assert_resumed(counter, runs, lambda c: image_path(cluster, c))
    assert runs.restored_from == [latest], "restored from the latest periodic image"
    assert "runner.preempted" not in [e.get("event") for e in runs.events], "no final checkpoint was possible"


def test_failed_job_without_requeue_is_resubmitted_and_restores(cluster: SlurmCluster, tmp_path: Path) -> None:
    counter = Counter(tmp_path, steps=40, interval=2)
    job = cluster.sbatch(counter.script("--no-requeue", "--job-name=resubme"))
    cluster.wait_state(job, ["RUNNING"], 60)
    wait_committed(cluster, job, 2)
    victims = job_processes(cluster, job)
    kill_pids(victims)  # the runner and the job die together, as in a crash
    failed = cluster.wait_state(job, ["FAILED"], 60)
    latest = _latest(cluster, job)
    assert failed["Requeue"] == "0" and failed["Restarts"] == "0"

    # Through the real command line, as a user would do it.
    proc = subprocess.run([sys.executable, "-m", "hpcckpt", "resume", job, "--submit", "--store", str(cluster.store)],
                          env={**cluster.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    new = proc.stdout.strip().splitlines()[-1]
    assert new.isdigit() and new != job
    fields = cluster.show_job(new)
    assert fields["JobName"] == "resubme" and fields["Requeue"] == "0", "the original sbatch options carry over"
    wait_done(cluster, new, 120)

    runs = parse_output(counter.output(job), counter.output(new))
    assert_resumed(counter, runs, lambda c: image_path(cluster, c))
    assert runs.restored_from == [latest]
    user = current_user()
    cat = open_catalog(None, cluster.store, user)
    try:
        rec = cat.get(latest)
        events = cat.job_events(job, uid=user.uid)
    finally:
        cat.close()
    assert rec is not None and rec.new_job_id == new, "lineage: the restored checkpoint names the new job"
    assert any(e.get("event") == "resubmitted" and new in str(e.get("detail")) for e in events)
    wait_for(lambda: not job_processes(cluster, job), 20, f"no process of failed job {job} left")
