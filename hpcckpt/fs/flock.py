"""Locks waited for in the kernel: ``flock`` with a timeout (the SQLite writer lock, the node's restore lock).

Why not a polling lock (``filelock``, which tries a non-blocking flock and
sleeps 50 ms between tries): with many writers, the lock sat idle for most of
each sleep after its holder let go, and 32 writers committed *fewer*
checkpoints per second than one. A blocked ``flock`` is woken by the kernel
(or, on a parallel filesystem, by its lock server) the moment the lock is
free, and costs no CPU while it waits.

POSIX has no timed ``flock``: a contended wait runs on a helper thread, and
the caller stops waiting at its deadline. A helper that gets the lock after
its caller gave up releases it at once.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class LockTimeout(Exception):
    """The lock was not free within the timeout."""


def _wait(fd: int, got: threading.Event, gate: threading.Lock, abandoned: list[bool]) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass  # the caller times out and reports it
    else:
        with gate:
            if not abandoned:
                got.set()
                return
    os.close(fd)  # the caller gave up: this thread owns the descriptor (closing it releases the lock)


@contextmanager
def exclusive(path: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created 0600) for the block; ``LockTimeout`` after ``timeout``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with holding(fd, timeout, path):
        yield


@contextmanager
def holding(fd: int, timeout: float, name: str = "") -> Iterator[None]:
    """Hold an exclusive flock on the open ``fd`` for the block; the block owns ``fd`` and closes it.

    ``LockTimeout`` when the lock was not free within ``timeout`` (``fd`` then belongs to the thread still
    waiting for it, which closes it).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        got, gate = threading.Event(), threading.Lock()
        abandoned: list[bool] = []
        threading.Thread(target=_wait, args=(fd, got, gate, abandoned), name="hpcckpt-flock",
                         daemon=True).start()
        if not got.wait(timeout):
            with gate:
                if not got.is_set():
                    abandoned.append(True)  # the waiting thread closes fd if it ever gets the lock
                    raise LockTimeout(name) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        # Closing the descriptor releases the lock; unlock first anyway, so that a descriptor leaked
        # into a child process could not keep it.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
