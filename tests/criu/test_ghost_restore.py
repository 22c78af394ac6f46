"""Two jobs that hold a deleted file at the same path restore at once on one node.

CRIU writes a deleted file back as ``PATH.cr.N.ghost`` during a restore; two restores at once with the
same PATH took or removed each other's ghost and failed (seen with OpenMPI's /dev/shm/open_mpi.0000 when
MPI jobs were requeued onto one node). hpcckpt.criu.restorelock makes a node's restores wait for each other.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import pytest

from hpcckpt.criu import restorelock
from tests.criu.harness import PROGS, Cmd, hpcckpt, job_pid, kill_everything, wait_for

GHOST = str(PROGS / "ghost_job.py")
STEPS, MIB = 120, 160


def _committed(cmd: Cmd) -> int:
    return len(cmd.events("checkpoint.committed"))


def _committed_once(cmd: Cmd) -> bool:
    return _committed(cmd) >= 1


def _counted(out: Path) -> list[str]:
    return out.read_text().split("\n")[:-1]


@pytest.mark.criu
def test_two_jobs_with_a_ghost_at_one_path_restore_at_once(work: Path) -> None:
    shared = work / "shm"
    shared.mkdir()
    outs = {job: work / f"{job}.txt" for job in ("ghost-a", "ghost-b")}
    for job, out in outs.items():  # one after the other: each deletes its own segment at the same path
        run = hpcckpt(["run", "--job-id", job, "--interval", "1", "--", sys.executable, GHOST, str(shared),
                       str(out), str(STEPS), str(MIB)], work, f"run-{job}", work / "store")
        pid = job_pid(job)
        wait_for(partial(_committed_once, run), 90, f"a checkpoint of {job}")
        kill_everything(run, pid)
        assert len(_counted(out)) < STEPS, f"{job} ended before it was killed"
    resumes = {job: hpcckpt(["resume", job], work, f"resume-{job}", work / "store") for job in outs}
    for job, res in resumes.items():
        assert res.wait(180) == 0, res.err.read_text()[-3000:]
        assert not res.events("resume.fallback"), f"{job} fell back: {res.events('resume.fallback')}"
    for job, out in outs.items():
        assert _counted(out) == [*map(str, range(STEPS)), "ghost ok"], f"{job}: {out.read_text()[-200:]}"


def test_the_restore_lock_is_roots_or_the_callers_only(tmp_path: Path) -> None:
    """Another user's lock file could be held by them for ever: it is not used, and the Prolog replaces it."""
    lock = tmp_path / "restore.lock"
    lock.write_bytes(b"")
    os.chown(lock, 1001, 1001)
    assert restorelock._open(lock) is None
    with restorelock.one_restore_at_a_time(lock, wait_s=1):
        pass  # unusable: the restore goes on without it
    restorelock.prepare(lock)
    st = lock.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o666)
    fd = restorelock._open(lock)
    assert fd is not None
    os.close(fd)
    lock.unlink()
    os.symlink("/etc/passwd", lock)
    assert restorelock._open(lock) is None  # never followed
    restorelock.prepare(lock)
    assert lock.is_file() and not lock.is_symlink()
