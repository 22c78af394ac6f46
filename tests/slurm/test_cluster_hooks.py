"""The project's hooks inside the real Slurm test cluster (no hpcckpt run needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from tests.slurm.cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_prolog_runs_in_slurm_and_saves_the_job(cluster: SlurmCluster) -> None:
    job = cluster.sbatch("#!/bin/sh\n#SBATCH --job-name=hooked\nsleep 1\n", "--requeue",
                         f"--output={cluster.base}/jobs/%j.out")
    cluster.wait_state(job, ["COMPLETED"], 60)
    user = current_user()
    jdir = cluster.store / user.name / job
    doc = json.loads((jdir / "slurm-job.json").read_text())
    assert doc["fields"]["JobName"] == "hooked" and "sleep 1" in doc["script"]
    assert (jdir.stat().st_mode & 0o777) == 0o700
    # The epilog cleaned the staging dir the prolog made.
    deadline = time.monotonic() + 20
    while (cluster.staging / user.name / job).exists() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not (cluster.staging / user.name / job).exists()
    assert "Traceback" not in cluster.hook_log_text()


def test_node_failure_requeues_elsewhere_without_the_120s_hold(cluster: SlurmCluster, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    job = cluster.sbatch(f"#!/bin/sh\necho $SLURMD_NODENAME >> {marker}\nsleep 300\n", "--requeue",
                         f"--output={cluster.base}/jobs/%j.out")
    info = cluster.wait_state(job, ["RUNNING"], 60)
    first = info["NodeList"]
    # Make it an hpcckpt job with a committed image, as its runner would have.
    user = current_user()
    cat = open_catalog(None, cluster.store, user)
    ck = cat.begin(job_id=job, uid=user.uid, user=user.name, node=first, engine="files")
    cat.commit(ck, path="/nonexistent", size_bytes=1, duration=0.1)
    procs_before = _job_pids(marker)
    cluster.kill_node(first)
    try:
        # EpilogSlurmctld sets StartTime=now (policy backoff 0) and ExcNodeList=<failed node>.
        info = cluster.wait_state(job, ["RUNNING"], 60)
        assert info["NodeList"] != first
        assert first in info.get("ExcNodeList", "")
        events = [e["event"] for e in cat.job_events(job, uid=user.uid)]
        assert "restart" in events
    finally:
        cat.close()
        cluster.cmd(["scancel", job], check=False)
        for pid in procs_before:
            _kill(pid)
        cluster.revive_node(first)


def _job_pids(marker: Path) -> list[int]:
    """Pids of the first run's shell: a dead slurmd leaves them running, the test ends them."""
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(marker) in cmd:
            out.append(proc.pid)
    return out


def _kill(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
