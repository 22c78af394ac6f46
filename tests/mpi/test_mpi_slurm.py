"""Real Slurm + OpenMPI: the sbatch example, 2 nodes x 2 ranks, is preempted and resumes bit-identically.

examples/mpi_integrate.sbatch runs examples/mpi_integrate.py with ``srun
--mpi=pmix`` in the low partition. Once it has a checkpoint, a high-priority
job that needs every node preempts it: Slurm sends SIGTERM to the ranks on
both nodes, they agree to save, write one checkpoint, exit 85, and Slurm
requeues the job. The requeued run must resume from exactly that checkpoint
and end with the same SHA-256 of the final field as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcckpt.app.shards import read_manifest
from hpcckpt.catalog import Status, open_catalog
from hpcckpt.catalog.model import CkptRecord
from hpcckpt.context import current_user
from tests.slurm.cluster import SlurmCluster
from tests.slurm.fixtures import cluster  # noqa: F401 - the per-test view of slurm_cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mpi_integrate.py"
SBATCH = REPO / "examples" / "mpi_integrate.sbatch"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.mpi,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mpirun") is None or shutil.which("srun") is None,
                       reason="needs OpenMPI's mpirun and Slurm's srun"),
]

# About 25 ms a step under srun on the shared 2 cores: the job is still early
# when its first checkpoint (step 200) lets the test preempt it, and the whole
# test stays near a minute.
STEPS = 1500
ARGS = ["--steps", str(STEPS), "--cells", "2000"]

# Every "node" of the test cluster is this one host. OpenMPI's shared-memory
# transport would treat ranks of node1 and node2 as neighbours by host name
# and crash; TCP over loopback works. yield_when_idle: 4 busy-polling ranks on
# 2 shared cores would otherwise starve each other (and the other tests).
TEST_HOST_MCA = {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_mpi_yield_when_idle": "1"}


def uninterrupted_result(env: dict[str, str], store: Path) -> dict[str, object]:
    """The reference: the same program and arguments, run to the end by a plain mpirun."""
    res = subprocess.run(
        ["mpirun", "-n", "4", "--oversubscribe", "--allow-run-as-root", sys.executable, str(EXAMPLE), *ARGS],
        env={**env, "HPCCKPT_STORE": str(store), "HPCCKPT_JOB_ID": "reference"},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc: dict[str, object] = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])
    return doc


def committed(slurm: SlurmCluster, job_id: str) -> list[CkptRecord]:
    user = current_user()
    if not (slurm.store / user.name / "catalog.sqlite").exists():
        return []
    cat = open_catalog(None, slurm.store, user)
    try:
        return cat.committed(job_id, uid=user.uid)
    finally:
        cat.close()


def wait_for_checkpoint(slurm: SlurmCluster, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not committed(slurm, job_id):
        state = slurm.job_state(job_id)
        assert state == "RUNNING", f"job {job_id} is {state} before its first checkpoint; see {slurm.base}/log"
        assert time.monotonic() < deadline, f"job {job_id}: no committed checkpoint in {timeout} s"
        time.sleep(0.5)


def test_preempted_two_node_mpi_job_resumes_bit_identical(
    cluster: SlurmCluster,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    pytest.importorskip("mpi4py")
    plugins = cluster.cmd(["srun", "--mpi=list"], check=False)
    if "pmix" not in plugins.stdout + plugins.stderr:
        pytest.skip("Slurm's mpi/pmix plugin is not installed (apt-get install slurm-wlm-basic-plugins)")
    env = {**cluster.env, **TEST_HOST_MCA, "PYTHONPATH": str(REPO)}
    reference = uninterrupted_result(env, tmp_path / "reference-store")

    out = tmp_path / "result.json"
    log = tmp_path / "job.out"
    job = cluster.sbatch(
        SBATCH.read_text(), "--partition=low", f"--output={log}", f"--chdir={tmp_path}",
        env={**env, "PYTHON": sys.executable, "MPI_INTEGRATE": str(EXAMPLE)},
        args=[*ARGS, "--sleep", "0.01", "--save-every", "200", "--out", str(out)],
    )
    info = cluster.wait_state(job, ["RUNNING"], 60)
    assert (info["NumNodes"], info["NumTasks"]) == ("2", "4"), info
    first_nodes = info["NodeList"]
    wait_for_checkpoint(cluster, job, 90)

    # Needs all three nodes, so Slurm must preempt the low job to run it.
    high = cluster.sbatch("#!/bin/sh\nsleep 2\n", "--partition=high", "--nodes=3",
                          f"--output={tmp_path}/high.out")
    cluster.wait_job(job, lambda j: j.get("Restarts") == "1", "requeued once", 90)
    preempted = log.read_text()
    stop = re.search(r"preempted: stopping at step (\d+)", preempted)
    assert stop, preempted[-3000:]
    assert int(stop.group(1)) < STEPS
    assert "Exited with exit code 85" in preempted, preempted[-3000:]  # srun reports the ranks' status

    cluster.wait_state(high, ["COMPLETED"], 90)
    cluster.release(job)  # ends the ~120 s BeginTime hold of a requeued job
    final = cluster.wait_state(job, ["COMPLETED"], 150)
    text = log.read_text()
    resumed = re.search(r"resumed at step (\d+) from checkpoint (\d+)", text)
    assert resumed, text[-3000:]
    # It resumed from the checkpoint taken at the preemption, not an older periodic one.
    assert resumed.group(1) == stop.group(1), text[-3000:]
    assert json.loads(out.read_text()) == reference
    assert final["Restarts"] == "1" and final["ExitCode"] == "0:0", final
    print(f"nodes {first_nodes} then {final['NodeList']}; stopped and resumed at step {stop.group(1)}")

    # That checkpoint is a committed, 4-shard checkpoint of this Slurm job id.
    ckptid = int(resumed.group(2))
    rows = {r.ckptid: r for r in committed(cluster, job)}
    assert ckptid in rows and rows[ckptid].status == Status.COMMITTED
    manifest = read_manifest(Path(rows[ckptid].path), staging=str(tmp_path))
    assert (manifest.job_id, manifest.ranks, len(manifest.shards)) == (job, 4, 4)
    for shard in manifest.shards:
        path = Path(rows[ckptid].path).parent / shard.name
        assert path.stat().st_size == shard.size
        assert (path.stat().st_mode & 0o777) == 0o600
    assert os.stat(Path(rows[ckptid].path).parent).st_mode & 0o777 == 0o700
