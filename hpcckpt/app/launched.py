"""What the two app engines share: starting the program, and ending it, without reaping it.

The Runner reaps the job (``waitpid``) and reports its status; an engine
only looks whether it ended (``waitid`` with ``WNOWAIT``). The program runs
in a session of its own (so that its whole tree can be signalled as a
group) and dies with the runner (``PR_SET_PDEATHSIG``): an app job is never
left running unmanaged.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.catalog import CkptRecord
from hpcckpt.core.checkpoint import CheckpointResult
from hpcckpt.core.runner.engines import EngineSetup, Launched, Result
from hpcckpt.criu import procinfo
from hpcckpt.errors import HpcckptError, UsageError
from hpcckpt.store.images import Store
from hpcckpt.store.retention import RetentionRules, apply_retention

_log = hlog.get("app")

PR_SET_PDEATHSIG = 1
_ERRNO = struct.Struct("<i")
_libc = ctypes.CDLL(None, use_errno=True)
# After SIGTERM, how long a program may take to end before it is killed.
TERM_GRACE_S = 5.0


def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Launched:
    """Start ``argv`` as our child in a session of its own, its stdout/stderr on fresh pipes."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    rep_r, rep_w = os.pipe2(os.O_CLOEXEC)  # the exec's errno, or EOF once it succeeded
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only execs
        try:
            os.setsid()
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the runner died before the prctl
                os._exit(127)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.chdir(cwd)
            os.execvpe(argv[0], list(argv), dict(env))
        except OSError as exc:
            os.write(rep_w, _ERRNO.pack(exc.errno or errno.EINVAL))
        os._exit(127)
    os.close(out_w)
    os.close(err_w)
    os.close(rep_w)
    try:
        got = os.read(rep_r, _ERRNO.size)
    finally:
        os.close(rep_r)
    if got:
        os.waitpid(pid, 0)
        os.close(out_r)
        os.close(err_r)
        code = _ERRNO.unpack(got)[0]
        raise UsageError(f"{argv[0]}: cannot start: {os.strerror(code)}", hint="check the command after '--'")
    return Launched(pid, out_r, err_r)


def exited(pid: int) -> bool:
    """Whether our child ``pid`` ended (it is left for the Runner to reap)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None and info.si_pid == pid


def signal_job(pid: int, sig: int) -> None:
    """``sig`` to the program's process group and to whatever of its tree left the group."""
    tree = procinfo.tree_pids(pid)  # before the signal: a dead launcher's children are no longer below it
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for p in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def wait_exit(pid: int, until: float) -> bool:
    while not exited(pid):
        if time.monotonic() >= until:
            return False
        time.sleep(0.05)
    return True


def end_job(pid: int, until: float) -> None:
    """The program should be ending by itself: wait until ``until``, then TERM, then KILL its tree."""
    if wait_exit(pid, until):
        return
    signal_job(pid, signal.SIGTERM)
    if not wait_exit(pid, time.monotonic() + TERM_GRACE_S):
        signal_job(pid, signal.SIGKILL)


class AppEngineBase:
    """The bookkeeping the ``files`` and ``api`` engines share (see :class:`hpcckpt.core.runner.engines.JobEngine`)."""

    name = "app"
    image_engine = "app"  # what their images' catalog rows say
    poll_s: float | None = 0.5

    def __init__(self, setup: EngineSetup) -> None:
        self.setup = setup
        self.notify: Callable[[], None] | None = None
        self.pid = -1
        self.last: int | None = None  # the newest committed ckptid of the job that this run knows of
        self._results: list[CheckpointResult] = []
        self._pending: list[str] = []  # requests waiting for a commit, oldest first
        self._count = 0

    def _catalog_rows(self) -> list[CkptRecord]:
        """The job's committed images of this engine, newest first."""
        cat = self.setup.open_catalog()
        try:
            rows = cat.committed(self.setup.job_id, uid=self.setup.user.uid)
        finally:
            cat.close()
        return [r for r in rows if r.engine == self.image_engine]

    def _key(self) -> str:
        self._count += 1
        return f"{self.name}-{self._count}"

    def _result(self, rec: CkptRecord, key: str, *, final: bool = False, seconds: float = 0.0) -> CheckpointResult:
        return CheckpointResult(ckptid=int(rec.ckptid), path=Path(rec.path), size_bytes=int(rec.size_bytes),
                                frozen_s=0.0, dump_s=0.0, pack_s=seconds, total_s=seconds, final=final,
                                parent=rec.parent, stage=key)

    def collect(self) -> list[Result]:
        out: list[Result] = list(self._results)
        self._results.clear()
        if out:
            self._retain()
        return out

    def _retain(self) -> None:
        """Retention after new commits, as the CRIU engine's flusher applies it (policy ``retention.*``)."""
        rules = RetentionRules.from_policy(self.setup.policy)
        try:
            cat = self.setup.open_catalog()
            try:
                apply_retention(cat, Store(self.setup.store_root, self.setup.user), rules, job_id=self.setup.job_id)
            finally:
                cat.close()
        except HpcckptError as err:  # the images stay: a later commit or 'hpcckpt gc' tries again
            hlog.event(_log, "retention.failed", f"job {self.setup.job_id}: retention failed: {err}", 30)

    def finish(self, timeout: float | None, *, job_ended: bool = True) -> bool:
        return True  # nothing is flushed in the background: each image was committed by who wrote it

    def cleanup_staging(self) -> None:
        pass

    def in_flight(self) -> list[str]:
        return list(self._pending)

    def has_image(self) -> bool:
        try:
            return bool(self._catalog_rows())
        except HpcckptError:
            return False

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "skipped": 0, "parent": self.last}

    def close(self) -> None:
        pass
