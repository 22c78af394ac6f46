"""Start a command as pid 1 and session leader of a new PID namespace, as our child.

Why a PID namespace: CRIU must restore every task with the pid it had, and a
job restored on another node (or twice at once) would clash with pids in use
there. Inside its own namespace the job's pids start at 1 and never clash.
Why a session leader: CRIU refuses a tree whose session leader lies outside
the dumped namespace.

How, without a shell or ``unshare(1)`` in between (so that the runner is the
job's real parent and sees its exit status): the runner marks itself a child
subreaper, forks a helper, the helper calls ``unshare(CLONE_NEWPID)`` and
forks the job (pid 1 of the new namespace), reports its host pid and exits.
The orphaned job is reparented to the nearest subreaper, the runner. This
must happen before the runner starts any thread: ``fork`` in a threaded
process may copy a lock held by another thread.

A failure to exec the command is reported back through a close-on-exec pipe,
so ``hpcckpt run -- no-such-cmd`` fails with a clear error, not exit 127.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hpcckpt.errors import EngineError, UsageError

PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWPID = 0x20000000
_PID = struct.Struct("<q")
_ERR = struct.Struct("<ii")  # (stage, errno); stage 1: setup, 2: exec

_libc = ctypes.CDLL(None, use_errno=True)


def set_child_subreaper() -> None:
    """Orphans below us come to us, not to init (restored jobs included)."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise EngineError(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")


@dataclass
class StdioPipes:
    """The pipes the job writes its stdout and stderr into; the runner reads the other ends."""

    out_r: int
    out_w: int
    err_r: int
    err_w: int
    # How CRIU names the job's ends (``pipe:[INODE]``) by job fd, recorded in
    # every image so that a restore can hand in fresh pipes with --inherit-fd.
    resources: dict[str, str]

    @classmethod
    def create(cls) -> StdioPipes:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        res = {"1": f"pipe:[{os.fstat(out_w).st_ino}]", "2": f"pipe:[{os.fstat(err_w).st_ino}]"}
        for fd in (out_r, err_r):
            os.set_inheritable(fd, False)
        return cls(out_r, out_w, err_r, err_w, res)

    def close_write_ends(self) -> None:
        for fd in (self.out_w, self.err_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.out_w = self.err_w = -1


def _child_exec(argv: Sequence[str], env: Mapping[str, str], cwd: str, pipes: StdioPipes, err_w: int) -> None:
    """In the job (pid 1): the smallest possible path from fork to exec."""
    stage = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(pipes.out_w, 1)
        os.dup2(pipes.err_w, 2)
        # Nothing of the runner's may leak into the job: CRIU would have to dump it.
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 65536)
        os.chdir(cwd)
        stage = 2
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as exc:
        os.write(err_w, _ERR.pack(stage, exc.errno or errno.EINVAL))
    os._exit(127)


def spawn_in_pid_namespace(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: str, pipes: StdioPipes
) -> int:
    """Start ``argv`` as pid 1 of a new PID namespace; return its host pid (our child)."""
    if not argv:
        raise UsageError("no command given", hint="hpcckpt run [OPTIONS] -- COMMAND [ARGS...]")
    set_child_subreaper()
    info_r, info_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    helper = os.fork()
    if helper == 0:  # the helper: unshare, fork the job, report, exit
        try:
            os.close(info_r)
            os.close(err_r)
            if _libc.unshare(CLONE_NEWPID) != 0:
                os.write(err_w, _ERR.pack(0, ctypes.get_errno()))
                os._exit(1)
            job = os.fork()
            if job == 0:
                os.close(info_w)
                _child_exec(argv, env, cwd, pipes, err_w)
            os.write(info_w, _PID.pack(job))
        finally:
            os._exit(0)
    os.close(info_w)
    os.close(err_w)
    try:
        os.waitpid(helper, 0)
        raw = os.read(info_r, _PID.size)
        # EOF once the job has exec'd (close-on-exec) or died: then the error, if any, is here.
        failure = b""
        while True:
            chunk = os.read(err_r, _ERR.size)
            if not chunk:
                break
            failure += chunk
    finally:
        os.close(info_r)
        os.close(err_r)
    if len(failure) >= _ERR.size:
        stage, code = _ERR.unpack_from(failure)
        if len(raw) == _PID.size:
            os.waitpid(_PID.unpack(raw)[0], 0)
        if stage == 0:
            raise EngineError(
                f"cannot create a PID namespace: {os.strerror(code)}",
                hint="hpcckpt run needs root (CAP_SYS_ADMIN) for its PID namespace; see docs/running.md",
            )
        if stage == 2:
            raise UsageError(f"cannot run {argv[0]!r}: {os.strerror(code)}",
                             hint="check the command name and that it is executable")
        raise EngineError(f"cannot set up the job's process ({cwd}): {os.strerror(code)}")
    if len(raw) != _PID.size:
        raise EngineError("the PID-namespace helper died before reporting the job's pid")
    return int(_PID.unpack(raw)[0])
