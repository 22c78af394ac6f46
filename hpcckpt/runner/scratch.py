"""A job's own temporary directories, so that names made from pids never collide between jobs.

Every job runs in a PID namespace of its own, so every job's processes have
the same small pids (1, 2, 3 ...). Programs that name temporary files after
their pid then collide between two jobs on one node: OpenMPI puts its session
directory in ``$TMPDIR/ompi.HOST.UID/pid.N`` (and the job that ends first
deletes the other's ``hwloc.sm``), and names its shared-memory segments
``/dev/shm/vader_segment.HOST.JOBID.RANK`` with a job id hashed from
``mpirun``'s pid, so two MPI jobs on a node would write into each other's
segments. Each job therefore gets

* ``TMPDIR`` = ``$TMPDIR/hpcckpt-UID/JOB`` (``/tmp`` when unset), and
* ``OMPI_MCA_btl_vader_backing_directory`` = ``/dev/shm/hpcckpt-UID/JOB``,

unless the user set them. Both are 0700 directories of the job's owner,
made before the job starts and made again, at the same paths (the job's
environment is restored with its memory), before it is restored. They are
removed when the job has ended for good; a job that stops to be requeued
keeps them for its restore on this node.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from hpcckpt import fsutil
from hpcckpt import log as hlog
from hpcckpt.context import User
from hpcckpt.errors import HpcckptError, StoreError
from hpcckpt.pipeline.staging import remove_tree_at

_log = hlog.get("runner.scratch")

SHM = Path("/dev/shm")
VADER = "OMPI_MCA_btl_vader_backing_directory"


def _own_base(parent: Path, user: User) -> Path:
    return parent / f"hpcckpt-{user.uid}"


def scratch_env(user: User, job_id: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to the job's environment (only those the user did not set)."""
    comp = fsutil.safe_job_component(job_id)
    out = {"TMPDIR": str(_own_base(Path(environ.get("TMPDIR") or "/tmp"), user) / comp)}
    if VADER not in environ and SHM.is_dir():
        out[VADER] = str(_own_base(SHM, user) / comp)
    return out


def prepare(user: User, paths: Iterable[str]) -> None:
    """Make each of ``paths`` a 0700 directory of ``user``, refusing one that another user holds."""
    for raw in paths:
        path = Path(raw)
        # PARENT/hpcckpt-UID/JOB: PARENT (/tmp, /dev/shm) is world-writable and trusted as a base;
        # everything below must be the user's own, never a symlink someone planted.
        try:
            fsutil.ensure_private_dir(path, user.uid, user.gid, base=path.parent.parent)
        except (HpcckptError, OSError) as err:
            raise StoreError(f"cannot prepare the job's temporary directory {path}: {err}",
                             hint=f"remove {path.parent} if it is not yours (it must be a directory of "
                                  f"uid {user.uid}), or set TMPDIR to a directory of your own") from err


def remove(user: User, paths: Iterable[str]) -> None:
    """Delete the job's temporary directories once it has ended for good (never following a link)."""
    for raw in paths:
        path = Path(raw)
        try:
            fd = fsutil.open_private_dir(path.parent, user.uid, user.gid, base=path.parent.parent, create=False)
        except (HpcckptError, OSError):
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                remove_tree_at(fd, path.name)
        except OSError as err:
            hlog.event(_log, "scratch.not_removed", f"{path}: could not remove the job's temporary directory: "
                       f"{err}", 30)
        finally:
            os.close(fd)
