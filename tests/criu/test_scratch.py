"""Each job's own temporary directories: pid-named files of two jobs never collide (real OpenMPI, real CRIU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.criu.harness import hpcckpt, job_pid, kill_everything, wait_for

pytestmark = [pytest.mark.criu, pytest.mark.mpi]

SIM = r"""
#include <mpi.h>
#include <stdio.h>
#include <unistd.h>
#include <stdlib.h>
int main(int argc, char **argv) {
  int n = atoi(argv[1]);
  MPI_Init(&argc, &argv);
  double x = 0;
  for (int i = 0; i < n; i++) { x += i * 0.5; printf("%d %.1f\n", i, x); fflush(stdout); usleep(20000); }
  MPI_Finalize();
  return 0;
}
"""


@pytest.fixture
def sim(tmp_path: Path) -> Path:
    src = tmp_path / "sim.c"
    src.write_text(SIM)
    exe = tmp_path / "sim"
    subprocess.run(["mpicc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def test_mpi_singleton_resumes_after_another_mpi_job_ended_on_the_node(work: Path, sim: Path) -> None:
    """Both jobs' OpenMPI session directories would be $TMPDIR/ompi.HOST.UID/pid.2 (every job's orted is
    pid 2 of its namespace); the job that ended first deleted the other's files and its resume failed."""
    shared = work / "shared-tmp"
    shared.mkdir()
    extra = {"TMPDIR": str(shared)}  # one TMPDIR for both jobs, as /tmp is for every job on a node
    long = hpcckpt(["run", "--job-id", "mpi-long", "--interval", "1", "--", str(sim), "100000"], work, "long",
                   work / "store", extra_env=extra)
    pid = job_pid("mpi-long")
    short = hpcckpt(["run", "--job-id", "mpi-short", "--interval", "3600", "--", str(sim), "5"], work, "short",
                    work / "store", extra_env=extra)
    assert short.wait(60) == 0
    wait_for(lambda: len(long.events("checkpoint.committed")) >= 2, 60, "two checkpoints of the MPI job")
    scratch = [p for p in (shared / f"hpcckpt-{os.getuid()}").iterdir() if p.is_dir()]
    assert sorted(p.name for p in scratch) == ["mpi-long"], "the finished job's directory must be gone"
    kill_everything(long, pid)
    before = [int(ln.split()[0]) for ln in long.out.read_text().splitlines()]
    res = hpcckpt(["resume", "mpi-long"], work, "resume", work / "store", extra_env=extra)
    wait_for(lambda: len(res.out.read_text().splitlines()) >= 5, 60, "the resumed MPI job to go on")
    after = [int(ln.split()[0]) for ln in res.out.read_text().splitlines()]
    assert 0 < after[0] <= before[-1] + 1
    kill_everything(res, job_pid("mpi-long"))
