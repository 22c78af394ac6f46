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
is the caller (:mod:`hpcckpt.runner.launch`). CRIU 4.2 cannot dump a user
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
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpcckpt import log as hlog
from hpcckpt.criuimg import UID_KINDS, scan_credentials
from hpcckpt.engine.base import AFTER_DUMP, DumpOptions, DumpResult, RestoreResult
from hpcckpt.engine.streamer import ImageStreamer
from hpcckpt.engine.streamer import Source as StreamSource
from hpcckpt.errors import (
    DeadlineExceededError,
    EngineError,
    EngineNotFoundError,
    HpcckptError,
    UnreadableImageError,
)

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


def dump_wrapper(pid: int, *, euid: int, same_userns: bool, nsenter: str = "nsenter") -> list[str]:
    """The argv prefix that starts criu where it can dump host pid ``pid``; empty for root."""
    if euid == 0 or same_userns:
        return []
    # --preserve-credentials: we stay the caller's kuid, which is uid 0 in the job's namespace, so
    # criu starts with every capability there (and none outside). Without it nsenter calls
    # setgroups(2), which the namespace denies.
    return [nsenter, f"--target={pid}", "--user", "--mount", "--preserve-credentials", "--"]


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


def _refused(what: str, res: Completed, log_path: Path, euid: int, otherwise: str) -> EngineError:
    """CRIU ran and failed: its log's relevant lines, and the known cause's hint or ``otherwise``."""
    excerpt = log_excerpt(log_path) or res.err.strip()
    return EngineError(f"{what} failed (exit {res.rc}); log: {log_path}", log_excerpt=excerpt,
                       hint=explain_failure(excerpt, euid=euid) or otherwise)


def _clean(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not any(n in ln for n in _NOISE))


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
        if euid != 0:
            same = user_namespace_of(pid) == user_namespace_of("self")
            wrapper = dump_wrapper(pid, euid=euid, same_userns=same, nsenter=_tool("nsenter"))
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
    ) -> RestoreResult:
        """Restore the tree in ``images_dir`` as a child of this process; return its host pid.

        ``inherit_fds`` maps a descriptor of ours to the resource it replaces
        in the image (``"pipe:[1234]"``), for CRIU's ``--inherit-fd``.

        With ``source`` (file name -> its content), CRIU reads every image
        through the image-streamer protocol (:mod:`hpcckpt.engine.streamer`)
        instead of from ``images_dir``, which then only holds the socket and
        CRIU's log. If the source fails (an image chunk that fails its
        checks), that error is raised, whatever CRIU made of its short read.
        ``gate`` runs before CRIU is given its first image (while CRIU starts
        up); if it raises, CRIU gets nothing and that error is raised.
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
        fds = dict(inherit_fds or {})
        for fd, resource in fds.items():
            args += ["--inherit-fd", f"fd[{fd}]:{resource}"]
        euid = os.geteuid()
        self._require_unprivileged_caps(euid)
        wrapper: list[str] = []
        if restore_needs_user_namespace(images_dir, euid=euid):
            wrapper = restore_wrapper(euid=euid, unshare=_tool("unshare"))
        streamer = None
        if source is not None:
            args.append("--stream")
            streamer = ImageStreamer(images_dir, source, gate=gate).start()
        try:
            res = self._run(args, timeout=timeout, pass_fds=list(fds), what="criu restore", wrapper=wrapper)
        finally:
            failed = streamer.close() if streamer is not None else None
        log_path = images_dir / log_name
        if failed is not None:
            if res.rc == 0:  # criu never needed the bad part; an image that fails a check is not used
                self._kill_restored(with_pid)
            if isinstance(failed, HpcckptError):
                raise failed
            raise EngineError(f"serving the images to criu failed: {failed}", log_excerpt=log_excerpt(log_path))
        if res.rc != 0:
            raise _refused(f"criu restore from {images_dir}", res, log_path, euid,
                           "try an older checkpoint (hpcckpt resume JOBID --ckpt ID) or run 'hpcckpt doctor'")
        try:
            pid = int(with_pid.read_text().strip())
        except (OSError, ValueError) as exc:
            raise EngineError(f"criu restore succeeded but wrote no usable pid file {with_pid}: {exc}",
                              log_excerpt=log_excerpt(log_path)) from exc
        hlog.event(_log, "criu.restored", f"restored pid {pid}", 10, pid=pid, seconds=round(res.seconds, 3))
        return RestoreResult(pid=pid, seconds=res.seconds, log_path=log_path)

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
