"""The catalog's writer lock: exclusive across processes, a timeout that gives up cleanly, no lock left behind."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest

from hpcckpt.fs import flock


def _hold(path: str, held: object, release: object) -> None:
    with flock.exclusive(path, 10):
        held.set()  # type: ignore[attr-defined]
        release.wait(30)  # type: ignore[attr-defined]


def test_second_holder_waits_times_out_then_gets_it(tmp_path: Path) -> None:
    path = str(tmp_path / "catalog.sqlite.lock")
    ctx = mp.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(path, held, release))
    other.start()
    try:
        assert held.wait(30)
        with pytest.raises(flock.LockTimeout), flock.exclusive(path, 0.2):
            pass
        release.set()
        other.join(30)
        assert other.exitcode == 0
        # The helper thread of the abandoned wait got the lock after the holder left, and let it go.
        with flock.exclusive(path, 10):
            pass
    finally:
        release.set()
        other.join(30)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_waiter_gets_the_lock_when_it_is_freed(tmp_path: Path) -> None:
    path = str(tmp_path / "l")
    ctx = mp.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(path, held, release))
    other.start()
    try:
        assert held.wait(30)
        release.set()
        with flock.exclusive(path, 30):  # waits in the kernel until the holder's exit frees it
            other.join(30)
            assert other.exitcode == 0
    finally:
        release.set()
        other.join(30)
    assert other.exitcode == 0


def test_lock_file_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("")
    os.symlink(tmp_path / "target", tmp_path / "l")
    with pytest.raises(OSError), flock.exclusive(str(tmp_path / "l"), 1):
        pass
