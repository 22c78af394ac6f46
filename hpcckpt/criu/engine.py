"""The CRIU adapter: the only code in hpcckpt that runs the ``criu`` binary.

Every call is an argv list (never a shell), run with a timeout in its own
session so that a CRIU that hangs can be killed with everything it forked.
Two kinds of failure are told apart, as borg and pycriu do:

* CRIU could not be started at all: :class:`EngineNotFoundError` (no such
  file) or :class:`EngineError` saying "permission denied" (not executable,
  or missing capabilities);
* CRIU ran and refused: :class:`EngineError` whose ``log_excerpt`` is the
  relevant tail of CRIU's own log file, which is what a user needs to see.

CRIU prints ``rlimit: Can't setup RLIMIT_NOFILE for self`` on every run when
it runs with file capabilities; that line is noise and is never reported.

Restore runs with ``--restore-sibling --restore-detached``: CRIU then forks
the restored root task with ``CLONE_PARENT``, so it becomes a child of the
process that called us (the runner) and CRIU itself exits. The runner can
``waitpid`` the job, and the job stays in the job step's cgroup and process
tracking (the failure mode of CRIU issue 2605 is a tree reparented to init).

Without root (euid != 0) criu runs with ``--unprivileged`` and its file
capabilities, and the job lives in a user namespace of its own where uid 0
is the caller (:mod:`hpcckpt.core.launch.spawn`). CRIU 4.2 cannot dump a user
namespace unprivileged: ``check_user_ns`` calls ``setgroups(0, NULL)``,
which needs CAP_SETGID on the host ("Unable to drop supplementary groups").
So criu never sees that namespace as foreign:

* dump: criu is started inside the job's user and mount namespaces
  (``nsenter --user --mount --preserve-credentials``), where it is root of
  the namespace. Only the PID namespace is dumped.
* restore: criu is started as root of a fresh user and mount namespace
  (``unshare --map-root-user --mount``) that maps nothing but the caller, and
  creates the PID namespace there, restoring pids with ``clone3(set_tid)``.
  Whatever ids an image claims, the kernel can give the restored tree no
  credentials but the caller's.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpcckpt import log as hlog
from hpcckpt.criu.images import UID_KINDS, scan_credentials
from hpcckpt.criu.interface import AFTER_DUMP, DumpOptions, DumpResult, RestoreResult
from hpcckpt.criu.restorelock import one_restore_at_a_time
from hpcckpt.criu.streamer import ImageStreamer
from hpcckpt.criu.streamer import Source as StreamSource
from hpcckpt.errors import DeadlineExceededError, EngineError, EngineNotFoundError, HpcckptError
from hpcckpt.image.errors import UnreadableImageError

_log = hlog.get("engine.criu")

ENV_CRIU = "HPCCKPT_CRIU"
# Where setup.sh and distributions install criu; sbin is often not on a user's PATH.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_NOISE = ("Can't setup RLIMIT_NOFILE",)
_EXCERPT_LINES = 25
CAP_SYS_PTRACE = 19
CAP_CHECKPOINT_RESTORE = 40
# struct vfs_cap_data (linux/capability.h): magic_etc, then {permitted, inheritable} x 2, all le32.
_VFS_CAP = struct.Struct("<I2I2I")
_INSTALL_HINT = "install CRIU >= 4.2 (sudo scripts/setup.sh) or point $HPCCKPT_CRIU at the criu binary"
_UTIL_LINUX_HINT = "install util-linux (nsenter and unshare), which an unprivileged checkpoint needs"
_CAPS_HINT = (
    "an ordinary user's checkpoints need criu with file capabilities: "
    "sudo setcap cap_sys_ptrace,cap_checkpoint_restore=eip {path} (see docs/running.md, 'Without root')"
)


def user_namespace_of(pid: int | str) -> int:
    """The inode of the user namespace task ``pid`` ("self" for us) lives in."""
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino
    except OSError as exc:
        raise EngineError(f"cannot read the user namespace of pid {pid}: {exc.strerror}",
                          hint="the job is gone, or belongs to another user") from exc


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"]))
    if not found:
        raise EngineNotFoundError(f"{name} was not found on PATH or in /usr/bin", hint=_UTIL_LINUX_HINT)
    return found


def restore_needs_user_namespace(images_dir: Path, *, euid: int) -> bool:
    """Whether the images were taken of a job in a user namespace of its own (see the module docstring).

    Such a job is uid 0 of its namespace, so all its recorded uids are 0; an
    ordinary user's job dumped without one records the user's own uid and is
    restored in place. Root never restores into a user namespace.
    """
    if euid == 0:
        return False
    uids = {c.id for c in scan_credentials(images_dir) if c.kind in UID_KINDS}
    return uids == {0}


def dump_wrapper(pid: int, *, euid: int, same_userns: bool, nsenter: str = "nsenter", net: bool = False
                 ) -> list[str]:
    """The argv prefix that starts criu where it can dump host pid ``pid``; empty when none is needed.

    ``net``: the job has a network namespace of its own. criu then runs inside
    it, so that it takes the namespace as its own and dumps only the job's
    sockets, not the namespace's links (the tap of its outside link is no
    part of the job): the restore recreates a fresh namespace instead.
    """
    if euid == 0 or same_userns:
        return [nsenter, f"--target={pid}", "--net", "--"] if net and euid == 0 else []
    # --preserve-credentials: we stay the caller's kuid, which is uid 0 in the job's namespace, so
    # criu starts with every capability there (and none outside). Without it nsenter calls
    # setgroups(2), which the namespace denies.
    return [nsenter, f"--target={pid}", "--user", "--mount", *(["--net"] if net else []),
            "--preserve-credentials", "--"]


NSEXEC = Path(__file__).resolve().parent / "nsexec.py"


def job_netns_is_own(pid: int) -> bool:
    """Whether host pid ``pid`` lives in a network namespace other than ours."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def private_restore_wrapper(*, euid: int, userns: bool, sync: Sequence[int]) -> list[str]:
    """The argv prefix that restores into a fresh network namespace (and user namespace when ``userns``).

    A small program of ours (:mod:`hpcckpt.criu.nsexec`), run by path with
    an isolated interpreter, since ``unshare(1)`` cannot bring the loopback up.
    """
    argv = [sys.executable, "-I", "-S", str(NSEXEC)]
    if userns:
        argv += ["--userns", f"{euid}:{os.getegid()}"]
    return [*argv, "--net", "--sync", f"{sync[0]}:{sync[1]}", "--"]


def network_lock(options: DumpOptions) -> list[str]:
    """CRIU's network lock for a dump or restore that carries TCP connections.

    In a job's own namespace every carried connection has both ends in the
    frozen tree and nothing outside can reach it (its outside link forwards
    nothing inbound), so there is nothing to lock ("skip"). In the node's
    namespace CRIU must filter the host's firewall: iptables where it is
    installed, else nftables (Debian 12 has no iptables by default).
    """
    if not options.tcp_established:
        return []
    if options.network == "private":
        return ["--network-lock", "skip"]
    if shutil.which("iptables-restore") is None and shutil.which("nft") is not None:
        return ["--network-lock", "nftables"]
    return []


def restore_wrapper(*, euid: int, unshare: str = "unshare") -> list[str]:
    """The argv prefix that gives criu a user and mount namespace of its own to restore into."""
    if euid == 0:
        return []
    # unshare(1) execs criu without forking, so criu stays our child and --restore-sibling makes the
    # restored job our child too. "unchanged": keep the host's mounts as slaves (the kernel's choice
    # for a less privileged namespace), as the job had them, instead of making them private.
    return [unshare, "--user", "--map-root-user", "--mount", "--propagation", "unchanged", "--"]


@dataclass
class Completed:
    rc: int
    out: str
    err: str
    seconds: float


def log_excerpt(log_path: Path, limit: int = _EXCERPT_LINES) -> str:
    """The error lines of a CRIU log (or its tail when it has none), noise removed."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip() and not any(n in ln for n in _NOISE)]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    chosen = errors if errors else lines
    return "\n".join(chosen[-limit:])


# CRIU log lines whose cause is known, and what to tell the user: (substring, explanation).
_KNOWN_FAILURES = (
    ("Unable to drop supplementary groups",
     "criu had to dump a user namespace, which CRIU 4.2 can do only with CAP_SETGID; an unprivileged "
     "job must be started by 'hpcckpt run' as the same user, so that criu runs inside its namespace"),
    ("doesn't belong to it",
     "the job's /proc belongs to another PID namespace and it may not mount its own: start it with "
     "'hpcckpt run' as this user (which gives it a mount namespace of its own)"),
    ("Unable to drop capability",
     "the job's capability bounding set differs from the restoring criu's and an unprivileged criu "
     "cannot drop capabilities (no CAP_SETPCAP); restore it as the user who ran it, with 'hpcckpt resume'"),
    ("Can't get rlimit",
     "criu could not read the job's resource limits: dump a job as the user who owns it"),
    ("Can't stop all tasks on rt_sigreturn",
     "the restored tasks died while criu was finishing the restore; see the log for the first task "
     "that failed (often a credential or capability criu could not restore unprivileged)"),
    ("set_tid",
     "criu could not give the restored tasks their pids: an unprivileged restore needs the job in a "
     "PID namespace of its own (as 'hpcckpt run' makes it) and criu with cap_checkpoint_restore"),
)


def explain_failure(excerpt: str, *, euid: int) -> str | None:
    """A hint for a CRIU failure whose cause is known, else None."""
    for needle, why in _KNOWN_FAILURES:
        if needle in excerpt:
            return why + ("" if euid != 0 else " (criu ran as root)")
    return None


# "(00.012) Error (criu/x.c:1): ...", "     1: Error (...): ..." (a restored task's line), "pie: 1: Error ..."
_ERROR_PREFIX = re.compile(r"^\s*(\(\s*[\d.]+\)\s*)?(\d+:\s*)?(pie: \d+: )?Error \([^)]*\):\s*")


def first_error(excerpt: str) -> str:
    """CRIU's own first error line, without its timestamp and source location; "" if it has none.

    That line is the cause; what follows is mostly CRIU unwinding (and a
    pipe that broke because CRIU died is never the cause).
    """
    for line in excerpt.splitlines():
        if _ERROR_PREFIX.match(line):
            return _ERROR_PREFIX.sub("", line).strip()
    return ""


def _refused(what: str, res: Completed, log_path: Path, euid: int, otherwise: str) -> EngineError:
    """CRIU ran and failed: its first error line as the headline, the log's relevant lines, a hint.

    The log's path is not named: it lives in a staging directory that is
    removed once the attempt is over; the excerpt travels with the error
    (and into the catalog row of a failed checkpoint) instead.
    """
    excerpt = log_excerpt(log_path) or res.err.strip()
    cause = first_error(excerpt) or (excerpt.splitlines()[-1] if excerpt else "")
    return EngineError(f"{what} failed (exit {res.rc})" + (f": {cause}" if cause else ""), log_excerpt=excerpt,
                       hint=explain_failure(excerpt, euid=euid) or otherwise)


def _clean(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not any(n in ln for n in _NOISE))


class _NetnsHandshake:
    """The runner's side of :mod:`hpcckpt.criu.nsexec`'s ``--sync``: once the fresh network namespace
    exists, ``on_netns(pid)`` runs (the job's outside link is attached), then CRIU may start."""

    TIMEOUT = 30.0

    def __init__(self, on_netns: Callable[[int], None] | None) -> None:
        self.on_netns = on_netns
        self.ready_r, ready_w = os.pipe()
        go_r, self.go_w = os.pipe()
        self.child_fds: tuple[int, ...] = (go_r, ready_w)

    def run(self, proc: subprocess.Popen[str]) -> None:
        for fd in self.child_fds:
            os.close(fd)
        self.child_fds = ()
        ready, _, _ = select.select([self.ready_r], [], [], self.TIMEOUT)
        if not ready or os.read(self.ready_r, 1) != b"r":
            err = proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else ""
            raise EngineError("could not create a network namespace to restore the job into",
                              log_excerpt=(err or "").strip()[-2000:],
                              hint="see 'hpcckpt doctor'; an ordinary user needs unprivileged user namespaces")
        if self.on_netns is not None:
            self.on_netns(proc.pid)
        os.write(self.go_w, b"g")

    def close(self) -> None:
        for fd in (self.ready_r, self.go_w, *self.child_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child_fds = ()


class Criu:
    """One criu binary. ``Criu.locate()`` finds it the way every command does."""

    name = "criu"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._version: str | None = None

    # -- finding and probing -------------------------------------------------

    @classmethod
    def locate(cls) -> Criu:
        """``$HPCCKPT_CRIU`` if set, else ``criu`` on PATH or in the sbin directories."""
        explicit = os.environ.get(ENV_CRIU)
        if explicit:
            if not os.path.exists(explicit):
                raise EngineNotFoundError(f"${ENV_CRIU} is {explicit!r}, which does not exist", hint=_INSTALL_HINT)
            if not os.access(explicit, os.X_OK):
                raise EngineError(f"${ENV_CRIU} is {explicit!r}, which is not executable by you",
                                  hint=_INSTALL_HINT)
            return cls(explicit)
        search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
        found = shutil.which("criu", path=search)
        if not found:
            raise EngineNotFoundError("criu was not found on PATH or in /usr/local/sbin, /usr/sbin",
                                      hint=_INSTALL_HINT)
        return cls(found)

    def _run(
        self,
        args: Sequence[str],
        *,
        timeout: float | None = None,
        pass_fds: Sequence[int] = (),
        what: str = "criu",
        wrapper: Sequence[str] = (),
        started: Callable[[subprocess.Popen[str]], None] | None = None,
    ) -> Completed:
        argv = [*wrapper, self.path, *args]
        t0 = time.monotonic()
        try:
            # A new session, so a timeout can kill criu and anything it forked in one go.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=tuple(pass_fds), start_new_session=True, text=True,
            )
        except FileNotFoundError as exc:
            missing = wrapper[0] if wrapper else self.path
            raise EngineNotFoundError(f"{missing}: no such file",
                                      hint=_UTIL_LINUX_HINT if wrapper else _INSTALL_HINT) from exc
        except PermissionError as exc:
            raise EngineError(f"{self.path}: permission denied (not executable by uid {os.getuid()})",
                              hint=_INSTALL_HINT) from exc
        if started is not None:
            try:
                started(proc)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            raise DeadlineExceededError(
                f"{what} did not finish within {timeout:.1f} s and was killed",
                hint="raise the deadline (--deadline, policy preemption.grace_margin) or checkpoint less memory",
            ) from None
        return Completed(proc.returncode, out, _clean(err), time.monotonic() - t0)

    def version(self) -> str:
        if self._version is None:
            res = self._run(["--version"], timeout=30)
            for line in res.out.splitlines():
                if line.startswith("Version:"):
                    self._version = line.split(":", 1)[1].strip()
                    break
            else:
                raise EngineError(f"{self.path} --version printed no version (rc {res.rc})",
                                  log_excerpt=(res.out + res.err)[-2000:], hint=_INSTALL_HINT)
        return self._version

    def check(self) -> tuple[bool, str]:
        res = self._run(["check", *self._mode()], timeout=120)
        return res.rc == 0, (res.out + res.err).strip()

    def has_feature(self, name: str) -> bool:
        return self._run(["check", *self._mode(), "--feature", name], timeout=60).rc == 0

    def unprivileged_capable(self) -> bool:
        """Whether the binary carries the file capabilities that ``--unprivileged`` needs."""
        try:
            raw = os.getxattr(self.path, "security.capability")
        except OSError:
            return False
        if len(raw) < _VFS_CAP.size:
            return False
        _magic, perm0, _inh0, perm1, _inh1 = _VFS_CAP.unpack_from(raw)
        permitted = perm0 | (perm1 << 32)
        need = (1 << CAP_SYS_PTRACE) | (1 << CAP_CHECKPOINT_RESTORE)
        return permitted & need == need

    def _require_unprivileged_caps(self, euid: int) -> None:
        """Without root, a criu lacking its file capabilities fails deep in its log; say why up front."""
        if euid != 0 and not self.unprivileged_capable():
            raise EngineError(
                f"{self.path} lacks the file capabilities cap_sys_ptrace and cap_checkpoint_restore, "
                f"so uid {euid} cannot checkpoint or restore with it",
                hint=_CAPS_HINT.format(path=self.path),
            )

    # -- dump and restore ----------------------------------------------------

    @staticmethod
    def _mode() -> list[str]:
        """Every criu subcommand refuses to run as non-root without ``--unprivileged``."""
        return ["--unprivileged"] if os.geteuid() != 0 else []

    @classmethod
    def _common(cls, options: DumpOptions) -> list[str]:
        args = cls._mode()
        if options.tcp_established:
            args.append("--tcp-established")
            args.extend(network_lock(options))
        if options.ext_unix_sk:
            args.append("--ext-unix-sk")
        if options.file_locks:
            args.append("--file-locks")
        if options.link_remap:
            args.append("--link-remap")
        args.extend(options.extra_args)
        return args

    def dump(
        self,
        pid: int,
        images_dir: Path,
        *,
        options: DumpOptions,
        after: str = "running",
        timeout: float | None = None,
        track_from: Path | None = None,
    ) -> DumpResult:
        """Freeze the tree rooted at host pid ``pid`` and write it to ``images_dir``.

        ``after``: ``"running"`` thaws the tree, ``"stopped"`` leaves every task
        SIGSTOPped (the caller reads /proc, then sends SIGCONT), ``"kill"`` ends it.
        ``track_from``: a :meth:`pre_dump` directory; only pages written since it
        are dumped, the rest are marked as in the parent (CRIU's ``parent`` link).
        """
        if after not in AFTER_DUMP:
            raise ValueError(f"after must be one of {AFTER_DUMP}, not {after!r}")
        extra = {"running": ["--leave-running"], "stopped": ["--leave-stopped"], "kill": []}[after]
        if track_from is not None:
            # CRIU wants the parent as a path relative to the images directory.
            extra += ["--track-mem", "--prev-images-dir", os.path.relpath(track_from, images_dir)]
        return self._dump("dump", pid, images_dir, options, extra, timeout)

    def pre_dump(self, pid: int, images_dir: Path, *, options: DumpOptions, timeout: float | None = None
                 ) -> DumpResult:
        """Copy the tree's memory while it runs (a short freeze to collect it) and start tracking writes.

        Needs the kernel's soft-dirty bits (``criu check --feature mem_dirty_track``).
        """
        return self._dump("pre-dump", pid, images_dir, options, ["--track-mem"], timeout)

    def _dump(self, action: str, pid: int, images_dir: Path, options: DumpOptions, extra: list[str],
              timeout: float | None) -> DumpResult:
        log_name = f"{action.replace('-', '')}.log"
        args = [action, "-t", str(pid), "-D", str(images_dir), "-o", log_name, *self._common(options), *extra]
        euid = os.geteuid()
        self._require_unprivileged_caps(euid)
        wrapper: list[str] = []
        own_net = options.network == "private" and job_netns_is_own(pid)
        if euid != 0 or own_net:
            same = euid == 0 or user_namespace_of(pid) == user_namespace_of("self")
            wrapper = dump_wrapper(pid, euid=euid, same_userns=same, nsenter=_tool("nsenter"), net=own_net)
        res = self._run(args, timeout=timeout, what=f"criu {action} of pid {pid}", wrapper=wrapper)
        log_path = images_dir / log_name
        if res.rc != 0:
            raise _refused(f"criu {action} of pid {pid}", res, log_path, euid,
                           "the job goes on running; see the log excerpt, and 'hpcckpt doctor' for this node")
        hlog.event(_log, f"criu.{action.replace('-', '')}ed", f"{action} of pid {pid} done", 10, pid=pid,
                   seconds=round(res.seconds, 3))
        return DumpResult(frozen_s=res.seconds, log_path=log_path, images_dir=images_dir)

    def restore(
        self,
        images_dir: Path,
        *,
        options: DumpOptions,
        inherit_fds: Mapping[int, str] | None = None,
        timeout: float | None = None,
        source: StreamSource | None = None,
        gate: Callable[[], None] | None = None,
        lazy_pages: bool = False,
    ) -> RestoreResult:
        """Restore the tree in ``images_dir`` as a child of this process; return its host pid.

        ``inherit_fds`` maps a descriptor of ours to the resource it replaces
        in the image (``"pipe:[1234]"``), for CRIU's ``--inherit-fd``.

        With ``source`` (file name -> its content), CRIU reads every image
        through the image-streamer protocol (:mod:`hpcckpt.criu.streamer`)
        instead of from ``images_dir``, which then only holds the socket and
        CRIU's log. If the source fails (an image chunk that fails its
        checks), that error is raised, whatever CRIU made of its short read.
        ``gate`` runs before CRIU is given its first image (while CRIU starts
        up); if it raises, CRIU gets nothing and that error is raised.
        ``lazy_pages``: memory is filled on demand by a :meth:`lazy_pages`
        daemon already listening in ``images_dir`` (:mod:`hpcckpt.core.lazyrestore`).
        """
        log_name, pidfile = "restore.log", "restored.pid"
        with_pid = images_dir / pidfile
        try:
            with_pid.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # criu would fail the same way, later and less clearly
            raise UnreadableImageError(f"{images_dir}: cannot prepare the restore: {exc.strerror}",
                                       hint="restore only images in a directory of your own") from exc
        args = ["restore", "-D", str(images_dir), "-o", log_name, "--pidfile", pidfile,
                "--restore-sibling", "--restore-detached", *self._common(options)]
        if lazy_pages:
            args.append("--lazy-pages")
        fds = dict(inherit_fds or {})
        for fd, resource in fds.items():
            args += ["--inherit-fd", f"fd[{fd}]:{resource}"]
        euid = os.geteuid()
        self._require_unprivileged_caps(euid)
        wrapper: list[str] = []
        userns = restore_needs_user_namespace(images_dir, euid=euid)
        netns = _NetnsHandshake(options.on_netns) if options.network == "private" else None
        if netns is not None:
            wrapper = private_restore_wrapper(euid=euid, userns=userns, sync=netns.child_fds)
        elif userns:
            wrapper = restore_wrapper(euid=euid, unshare=_tool("unshare"))
        streamer = None
        with one_restore_at_a_time():  # ghosts of one path from two jobs would collide (restorelock.py)
            if source is not None:
                args.append("--stream")
                streamer = ImageStreamer(images_dir, source, gate=gate).start()
            try:
                res = self._run(args, timeout=timeout, what="criu restore", wrapper=wrapper,
                                pass_fds=[*fds, *(netns.child_fds if netns else ())],
                                started=netns.run if netns is not None else None)
            finally:
                failed = streamer.close() if streamer is not None else None
                if netns is not None:
                    netns.close()
        log_path = images_dir / log_name
        if failed is not None:
            if res.rc == 0:  # criu never needed the bad part; an image that fails a check is not used
                self._kill_restored(with_pid)
            if isinstance(failed, HpcckptError):
                raise failed
            if res.rc != 0:  # criu died first and broke the pipe: its own error is the cause
                raise _refused("criu restore", res, log_path, euid,
                               "try an older checkpoint (hpcckpt resume JOBID --ckpt ID) or run 'hpcckpt doctor'")
            raise EngineError(f"serving the images to criu failed: {failed}", log_excerpt=log_excerpt(log_path))
        if res.rc != 0:
            raise _refused("criu restore", res, log_path, euid,
                           "try an older checkpoint (hpcckpt resume JOBID --ckpt ID) or run 'hpcckpt doctor'")
        try:
            pid = int(with_pid.read_text().strip())
        except (OSError, ValueError) as exc:
            raise EngineError(f"criu restore succeeded but wrote no usable pid file {with_pid}: {exc}",
                              log_excerpt=log_excerpt(log_path)) from exc
        hlog.event(_log, "criu.restored", f"restored pid {pid}", 10, pid=pid, seconds=round(res.seconds, 3))
        return RestoreResult(pid=pid, seconds=res.seconds, log_path=log_path)

    def lazy_pages(self, images_dir: Path, *, ps_fd: int, status_fd: int) -> subprocess.Popen[bytes]:
        """Start ``criu lazy-pages`` in ``images_dir``, asking the page server on socket ``ps_fd`` for pages.

        It writes a byte to ``status_fd`` once its socket listens (then a
        ``restore(lazy_pages=True)`` may start) and exits once every page of
        every restored task has been copied in (or on an error, see its log).
        Errors only in its log: it warns on every request that the socket is not TCP.
        """
        self._require_unprivileged_caps(os.geteuid())
        argv = [self.path, "lazy-pages", *self._mode(), "-D", str(images_dir), "-o", "lazy-pages.log", "-v1",
                "--page-server", "--ps-socket", str(ps_fd), "--status-fd", str(status_fd)]
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, pass_fds=(ps_fd, status_fd), start_new_session=True)
        except OSError as exc:
            raise EngineError(f"{self.path}: cannot start criu lazy-pages: {exc.strerror}",
                              hint=_INSTALL_HINT) from exc

    @staticmethod
    def _kill_restored(pidfile: Path) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # --restore-sibling: it is our child

    def cpuinfo_dump(self, images_dir: Path) -> None:
        res = self._run(["cpuinfo", "dump", *self._mode(), "-D", str(images_dir), "-o", "cpuinfo-dump.log"],
                        timeout=60)
        if res.rc != 0:
            raise EngineError("criu cpuinfo dump failed",
                              log_excerpt=log_excerpt(images_dir / "cpuinfo-dump.log") or res.err)

    def cpuinfo_check(self, images_dir: Path) -> tuple[bool, str]:
        """Whether this CPU offers every feature recorded by ``cpuinfo_dump``; the reason if not."""
        log_name = "cpuinfo-check.log"
        res = self._run(["cpuinfo", "check", *self._mode(), "-D", str(images_dir), "-o", log_name], timeout=60)
        if res.rc == 0:
            return True, ""
        return False, log_excerpt(images_dir / log_name) or res.err.strip()
