"""One ``criu restore`` at a time on a node.

CRIU restores a file the job had open but deleted (a "ghost") by writing
its content to ``PATH.cr.N.ghost`` beside the old path and opening that.
Two jobs restoring at once with a ghost of the same path take or remove
each other's ghost, and both restores fail ("Can't link ... .ghost",
"Can't create ghost regfile: File exists"). Such paths are common: every
OpenMPI process's POSIX shared memory starts as ``/dev/shm/open_mpi.0000``,
deleted once attached, so two MPI jobs requeued onto one node after a node
failure collided in the corpus tests.

So restores on a node wait for each other (a restore holds the lock from
CRIU's start until it has restored or failed, about a second for most jobs,
less with lazy pages). The lock is a file in ``/dev/shm`` that every user
can lock, made by root (the Slurm Prolog, :func:`prepare`) or by the first
restore. Only root's file or the caller's own is used: a file another user
made could be held by them for ever. A lock that cannot be had (not a plain
file, another user's, or held by another restore for longer than
``WAIT_S``) is logged and the restore goes on without it: the lock only
avoids a race, it never stops a job from coming back.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcckpt import log as hlog
from hpcckpt.fs.flock import LockTimeout, holding

_log = hlog.get("criu")

LOCK = Path("/dev/shm/hpcckpt-restore.lock")
WAIT_S = 120.0


def _create(path: Path) -> int:
    """Make the lock file, 0666 despite the umask: every user's restores take it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        os.fchmod(fd, 0o666)
    except OSError:
        os.close(fd)
        raise
    return fd


def _open(path: Path) -> int | None:
    """The lock file, opened read-write; None where it cannot be used."""
    for _ in range(2):  # another restore may make it between our two tries
        try:
            # Without O_CREAT first: protected_regular refuses O_CREAT on another user's file in a sticky dir.
            return _usable(os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK))
        except FileNotFoundError:
            pass
        except OSError:
            return None
        try:
            return _usable(_create(path))
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


def _usable(fd: int) -> int | None:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_uid in (0, os.geteuid()):
        return fd
    os.close(fd)
    return None


def prepare(path: Path = LOCK) -> None:
    """As root (the Prolog): make the lock root's own file, 0666, replacing one a user made."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o666:
            return
        os.unlink(path)  # a user's file, a symlink, a FIFO: gone (root may, in the sticky /dev/shm)
    try:
        os.close(_create(path))
    except FileExistsError:
        pass  # a restore made it meanwhile: it is used if it is root's or the caller's


@contextmanager
def one_restore_at_a_time(path: Path = LOCK, wait_s: float = WAIT_S) -> Iterator[None]:
    fd = _open(path)
    if fd is None:
        hlog.event(_log, "criu.restore_lock_unusable", f"{path}: cannot use the node's restore lock; "
                   "restoring without it", 20)
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(holding(fd, wait_s, str(path)))
        except LockTimeout:
            hlog.event(_log, "criu.restore_lock_busy", f"{path}: another restore held the node's restore lock "
                       f"for {wait_s:.0f} s; restoring without it", 30)
        yield
