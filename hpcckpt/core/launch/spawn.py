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

Without root (euid != 0), creating a PID namespace needs CAP_SYS_ADMIN in
the user namespace that owns it, so the helper first creates a user
namespace of its own, mapping uid and gid 0 inside to the caller (the only
mapping an ordinary user may write), plus a mount namespace. Why uid 0
inside: the job must be root *of its namespace* for two things CRIU needs.
The dump's parasite mounts a /proc that belongs to the job's PID namespace,
which takes CAP_SYS_ADMIN over the job's mount namespace; and the restore
runs criu as root of a fresh user namespace, so that it may create the PID
namespace and restore pids with ``clone3(set_tid)``. Outside, every file
the job creates is the caller's and it has no privilege over anything of
the host; inside, ``id`` says root (see docs/running.md, "Without root").

With ``network=True`` (policy ``job.network: private``, the default) the
helper also unshares a network namespace and brings its loopback up; the
job then waits on a gate pipe until the runner has attached its link to the
outside (:mod:`hpcckpt.core.launch.network`), so that its first instruction
already sees the network it will always see.

A failure to exec the command is reported back through a close-on-exec pipe,
so ``hpcckpt run -- no-such-cmd`` fails with a clear error, not exit 127.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hpcckpt.criu.nsexec import CLONE_NEWNET, loopback_up, write_id_maps
from hpcckpt.errors import EngineError, UsageError

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
_PID = struct.Struct("<q")
# (stage, errno); stage 0: unshare, 1: setup, 2: exec, 3: writing the user namespace's id maps, 4: loopback
_ERR = struct.Struct("<ii")
_STAGE_UNSHARE, _STAGE_SETUP, _STAGE_EXEC, _STAGE_IDMAP, _STAGE_NET = 0, 1, 2, 3, 4
_USERNS_HINT = (
    "an ordinary user's job needs unprivileged user namespaces: check that sysctl user.max_user_namespaces "
    "is above 0 (and, where they exist, kernel.unprivileged_userns_clone=1 and "
    "kernel.apparmor_restrict_unprivileged_userns=0); or run hpcckpt as root. See docs/running.md"
)

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


def needs_user_namespace(euid: int | None = None) -> bool:
    """Whether a job started (or restored) by ``euid`` must live in a user namespace of its own."""
    return (os.geteuid() if euid is None else euid) != 0


def namespace_flags(user_namespace: bool, network: bool = False) -> int:
    """The ``unshare(2)`` flags for a job's namespaces."""
    net = CLONE_NEWNET if network else 0
    if user_namespace:
        # The mount namespace is owned by the new user namespace, so the job (root there) may mount
        # the /proc of its PID namespace; the kernel turns the host's shared mounts into slaves,
        # so mounts made on the host later (autofs homes, scratch) still reach the job.
        return CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | net
    return CLONE_NEWPID | net


def _wait_for_runner(gate_r: int) -> None:
    """In the job, before exec: wait for the runner's go-ahead, then die with the runner.

    The runner writes one byte once it has reaped the helper (we are its
    child then) and the job's network is ready; EOF means it gave up (or
    died), and the command must not start. PR_SET_PDEATHSIG fires when the
    *current* parent dies, which is why it is set only now: our first parent
    is the helper, which exits at once. If the runner died just before the
    prctl, its end of the pipe is closed (EOF): give up rather than run
    unmanaged (``getppid()`` cannot tell: it is 0 for pid 1). CRIU saves and
    restores the setting (and restores the job with CLONE_PARENT as the
    runner's child), so a resumed job dies with its runner too. The parent
    is a *thread*: the job is adopted by the runner's main thread; a restore
    must run criu from the main thread too, or the job would die with the
    thread that ran it.
    """
    if os.read(gate_r, 1) != b"g":
        os._exit(127)
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if select.select([gate_r], [], [], 0)[0]:  # EOF: the runner died before the prctl
        os._exit(127)
    os.close(gate_r)


def _child_exec(argv: Sequence[str], env: Mapping[str, str], cwd: str, pipes: StdioPipes, err_w: int,
                gate_r: int) -> None:
    """In the job (pid 1): the smallest possible path from fork to exec."""
    stage = _STAGE_SETUP
    try:
        _wait_for_runner(gate_r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(pipes.out_w, 1)
        os.dup2(pipes.err_w, 2)
        # Nothing of the runner's may leak into the job: CRIU would have to dump it (and, in a
        # mount namespace of the job's own, could not even name a file opened before it).
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 65536)
        os.chdir(cwd)
        stage = _STAGE_EXEC
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as exc:
        os.write(err_w, _ERR.pack(stage, exc.errno or errno.EINVAL))
    os._exit(127)


def _helper(flags: int, uid: int, gid: int, argv: Sequence[str], env: Mapping[str, str], cwd: str,
            pipes: StdioPipes, info_w: int, err_w: int, gate_r: int) -> None:
    """The forked helper: unshare, fork the job, report its pid, exit. Never returns."""
    try:
        if _libc.unshare(flags) != 0:
            os.write(err_w, _ERR.pack(_STAGE_UNSHARE, ctypes.get_errno()))
            os._exit(1)
        if flags & CLONE_NEWUSER:
            try:
                write_id_maps(uid, gid)  # root of the new namespace, as the caller outside
            except OSError as exc:
                os.write(err_w, _ERR.pack(_STAGE_IDMAP, exc.errno or errno.EINVAL))
                os._exit(1)
        if flags & CLONE_NEWNET:
            try:
                loopback_up()
            except OSError as exc:
                os.write(err_w, _ERR.pack(_STAGE_NET, exc.errno or errno.EINVAL))
                os._exit(1)
        job = os.fork()
        if job == 0:
            os.close(info_w)
            _child_exec(argv, env, cwd, pipes, err_w, gate_r)
        os.write(info_w, _PID.pack(job))
    finally:
        os._exit(0)


def spawn_in_pid_namespace(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    pipes: StdioPipes,
    user_namespace: bool | None = None,
    network: bool = False,
    before_exec: Callable[[int], None] | None = None,
) -> int:
    """Start ``argv`` as pid 1 of a new PID namespace; return its host pid (our child).

    ``user_namespace``: also put the job in a user and mount namespace of its
    own (see the module docstring); ``None`` means "when not root", which is
    what the CRIU adapter expects at dump and restore time.
    ``network``: also a network namespace of its own, loopback up.
    ``before_exec(pid)`` runs once the job exists but before it execs ``argv``
    (the runner attaches the job's outside link there); if it raises, the job
    is ended and the error raised.
    """
    if not argv:
        raise UsageError("no command given", hint="hpcckpt run [OPTIONS] -- COMMAND [ARGS...]")
    userns = needs_user_namespace() if user_namespace is None else user_namespace
    flags = namespace_flags(userns, network)
    uid, gid = os.geteuid(), os.getegid()
    set_child_subreaper()
    info_r, info_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    # The job waits on it before exec (see _wait_for_runner); close-on-exec, so the command never sees it.
    gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
    helper = os.fork()
    if helper == 0:
        os.close(info_r)
        os.close(err_r)
        os.close(gate_w)
        _helper(flags, uid, gid, argv, env, cwd, pipes, info_w, err_w, gate_r)
    os.close(info_w)
    os.close(err_w)
    os.close(gate_r)
    failure = raw = b""
    opened = False
    try:
        os.waitpid(helper, 0)
        raw = os.read(info_r, _PID.size)
        if len(raw) == _PID.size:
            if before_exec is not None:
                before_exec(int(_PID.unpack(raw)[0]))
            # The helper is reaped, so the job has been reparented to us: it may now tie its life to
            # ours. The gate stays open until the job has exec'd: its EOF would mean we died.
            os.write(gate_w, b"g")
            opened = True
        # EOF once the job has exec'd (close-on-exec) or died: then the error, if any, is here.
        while True:
            chunk = os.read(err_r, _ERR.size)
            if not chunk:
                break
            failure += chunk
    except BaseException:
        os.close(gate_w)  # unopened, it makes the job exit; reap it
        gate_w = -1
        if len(raw) == _PID.size:
            if opened:  # it may be running the command already
                with contextlib.suppress(ProcessLookupError):
                    os.kill(_PID.unpack(raw)[0], signal.SIGKILL)
            os.waitpid(_PID.unpack(raw)[0], 0)
        raise
    finally:
        if gate_w >= 0:
            os.close(gate_w)
        os.close(info_r)
        os.close(err_r)
    if len(failure) >= _ERR.size:
        stage, code = _ERR.unpack_from(failure)
        if len(raw) == _PID.size:
            os.waitpid(_PID.unpack(raw)[0], 0)
        raise _spawn_error(stage, code, argv, cwd, userns)
    if len(raw) != _PID.size:
        raise EngineError("the PID-namespace helper died before reporting the job's pid")
    return int(_PID.unpack(raw)[0])


def _spawn_error(stage: int, code: int, argv: Sequence[str], cwd: str, userns: bool) -> Exception:
    reason = os.strerror(code)
    if stage == _STAGE_UNSHARE:
        if userns:
            return EngineError(f"cannot create the job's user, mount and PID namespaces: {reason}",
                               hint=_USERNS_HINT)
        return EngineError(f"cannot create a PID namespace: {reason}",
                           hint="as root this needs CAP_SYS_ADMIN in the bounding set; see docs/running.md")
    if stage == _STAGE_NET:
        return EngineError(f"cannot bring up the loopback of the job's network namespace: {reason}",
                           hint="set job.network: host in a policy to run without a namespace of its own")
    if stage == _STAGE_IDMAP:
        return EngineError(f"cannot map uid {os.geteuid()} to root of the job's user namespace: {reason}",
                           hint=_USERNS_HINT)
    if stage == _STAGE_EXEC:
        return UsageError(f"cannot run {argv[0]!r}: {reason}", hint="check the command name and that it is executable")
    return EngineError(f"cannot set up the job's process ({cwd}): {reason}")
