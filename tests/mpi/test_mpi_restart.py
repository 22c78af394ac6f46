"""Real OpenMPI: a 4-rank mpi4py program is killed and resumes bit-identically.

Runs examples/mpi_integrate.py under ``mpirun -n 4 --oversubscribe
--allow-run-as-root`` against a store in a temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from hpcckpt.catalog import Status, open_catalog
from hpcckpt.context import current_user
from hpcckpt.exitcodes import EXIT_MPI, EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mpi_integrate.py"
MPIRUN = shutil.which("mpirun")

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.slow,
    pytest.mark.skipif(MPIRUN is None, reason="OpenMPI's mpirun is not installed"),
]


def env_for(store: Path, job_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCCKPT_", "SLURM_"))}
    env.update(
        HPCCKPT_STORE=str(store),
        HPCCKPT_JOB_ID=job_id,
        HPCCKPT_LOG_FORMAT="json",
        PYTHONPATH=str(REPO),
        OMPI_MCA_rmaps_base_oversubscribe="1",
        # Ranks killed with SIGKILL never remove their shared-memory segments: keep them in the test's
        # own directory, not in /dev/shm where every run would leave 16 MiB behind.
        OMPI_MCA_btl_vader_backing_directory=str(store.parent),
    )
    return env


def mpirun_cmd(n: int, *args: str) -> list[str]:
    assert MPIRUN is not None
    return [MPIRUN, "-n", str(n), "--oversubscribe", "--allow-run-as-root", sys.executable, str(EXAMPLE),
            *args]


def run_to_end(store: Path, job_id: str, n: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mpirun_cmd(n, *args), env=env_for(store, job_id), capture_output=True, text=True,
                          timeout=300)


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    doc: dict[str, Any] = json.loads(line)
    return doc


def catalog_rows(store: Path, job_id: str) -> list[Any]:
    cat = open_catalog(None, store, current_user())
    try:
        return cat.list(job_id)
    finally:
        cat.close()


def wait_until(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def rank_pid(launcher: subprocess.Popen[str], rank: int) -> int:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("OMPI_COMM_WORLD_RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    return 0


def kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)


STEPS = "600"
CELLS = "20000"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run's result."""
    store = tmp_path_factory.mktemp("ref") / "store"
    return result_of(run_to_end(store, "ref", 4, "--steps", STEPS, "--cells", CELLS))


def test_all_ranks_killed_then_restart_is_bit_identical(tmp_path: Path, reference: dict[str, Any]) -> None:
    store = tmp_path / "store"
    job = "killall"
    proc = subprocess.Popen(
        mpirun_cmd(4, "--steps", STEPS, "--cells", CELLS, "--save-every", "100", "--sleep", "0.01"),
        env=env_for(store, job), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: store.exists() and any(r.status == Status.COMMITTED for r in catalog_rows(store, job)),
            120, "the first committed checkpoint",
        )
    finally:
        kill_group(proc)  # every rank and mpirun, at once, with SIGKILL
    assert proc.returncode != 0
    done = [r for r in catalog_rows(store, job) if r.status == Status.COMMITTED]
    assert done, "the run was killed before any checkpoint committed"

    resumed = run_to_end(store, job, 4, "--steps", STEPS, "--cells", CELLS)
    assert "resumed at step" in resumed.stdout, resumed.stdout + resumed.stderr[-2000:]
    step = int(resumed.stdout.split("resumed at step ")[1].split()[0])
    assert 0 < step < int(STEPS)
    assert result_of(resumed) == reference


def test_rank_killed_during_commit_keeps_previous_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    job = "killone"
    # Big shards, so that a checkpoint takes long enough to kill a rank in it.
    cells, steps = "2000000", "60"
    ref = result_of(run_to_end(tmp_path / "ref", "ref", 4, "--steps", steps, "--cells", cells))
    proc = subprocess.Popen(
        mpirun_cmd(4, "--steps", steps, "--cells", cells, "--save-every", "20"),
        env=env_for(store, job), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    job_dir = store / current_user().name / job
    try:
        first = wait_until(
            lambda: [r.ckptid for r in catalog_rows(store, job) if r.status == Status.COMMITTED]
            if store.exists() else [],
            120, "the first committed checkpoint",
        )[0]
        victim = wait_until(lambda: rank_pid(proc, 2), 30, "rank 2's pid")
        # Kill rank 2 the moment it starts writing its shard of the next checkpoint.
        prefix = f".tmp-ckpt-{first + 1}.r2.hck"
        wait_until(lambda: any(n.startswith(prefix) for n in os.listdir(job_dir)), 120, "rank 2's shard")
        os.kill(victim, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.returncode is None:
            kill_group(proc)
    assert proc.returncode != 0
    rows = {r.ckptid: r for r in catalog_rows(store, job)}
    assert rows[first].status == Status.COMMITTED
    assert rows[first + 1].status != Status.COMMITTED
    assert not (job_dir / f"ckpt-{first + 1}.hck").exists()

    resumed = run_to_end(store, job, 4, "--steps", steps, "--cells", cells)
    assert f"resumed at step 20 from checkpoint {first}" in resumed.stdout, resumed.stderr[-2000:]
    assert result_of(resumed) == ref


def test_restart_with_fewer_ranks_is_refused_clearly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result_of(run_to_end(store, "shrink", 4, "--steps", "40", "--cells", "1000", "--save-every", "20"))
    proc = run_to_end(store, "shrink", 2, "--steps", "80", "--cells", "1000")
    assert proc.returncode == EXIT_MPI, proc.stderr[-2000:]
    assert "was taken with 4 ranks, this run has 2" in proc.stderr
    assert "restart with 4 ranks" in proc.stderr


def catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler installed for ``sig`` (the SigCgt mask in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_preemption_signal_to_one_rank_stops_all_after_a_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    job = "preempt"
    proc = subprocess.Popen(
        mpirun_cmd(4, "--steps", "100000", "--cells", "1000", "--sleep", "0.002"),
        env=env_for(store, job), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        victim = wait_until(lambda: rank_pid(proc, 3), 60, "rank 3's pid")
        # Until its handler is installed, SIGUSR1 would simply kill it (seen under load with a fixed sleep).
        wait_until(lambda: catches(victim, signal.SIGUSR1), 60, "rank 3's SIGUSR1 handler")
        os.kill(victim, signal.SIGUSR1)  # only rank 3 hears it
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.returncode is None:
            kill_group(proc)
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    assert "preempted: stopping at step" in out
    step = int(out.split("preempted: stopping at step ")[1].split(";")[0])
    rows = [r for r in catalog_rows(store, job) if r.status == Status.COMMITTED]
    assert len(rows) == 1
    resumed = run_to_end(store, job, 4, "--steps", str(step + 5), "--cells", "1000")
    assert f"resumed at step {step} from checkpoint {rows[0].ckptid}" in resumed.stdout
    assert result_of(resumed)["steps"] == step + 5
