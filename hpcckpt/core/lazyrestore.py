"""Lazy restore: the job runs again as soon as its non-page state is back; its memory follows.

Policy ``restore.lazy`` (``auto`` | ``on`` | ``off``; ``auto`` above
``restore.lazy_threshold`` bytes of memory). The pieces, for one restore:

1. The image is prepared as for a streamed restore (everything checked but
   the chunk data of its memory pages). The pagemaps say which page runs
   CRIU may fill through userfaultfd (:mod:`hpcckpt.criu.pagemap`); every
   other byte of the pages files (stacks, file-backed private pages, shared
   memory) is written, checked, into sparse ``pages-N.img`` files in the
   restore's private directory. The lazy runs stay holes.
2. ``criu lazy-pages`` starts there, with one end of a socket pair as its
   page server: us (:mod:`hpcckpt.criu.pageserver`), answering from the
   image through :class:`~hpcckpt.image.lazy.LazyPages`, which checks each
   chunk (record checksum, codec, content hash) before any page of it is
   sent. Then ``criu restore --lazy-pages`` runs and returns as soon as the
   tasks are back: the job runs, and a page it touches first comes on
   demand; the daemon asks for all others in the background, in address
   (image) order, and our prefetch reads and checks the image's chunks
   ahead of it.
3. :attr:`LazyRestore.resident` is set once the daemon has copied every
   page in and exited; the runner takes no checkpoint before that
   (:meth:`LazyRestore.wait_resident`). The restore directory and the
   image stay open until then.

If a chunk fails its checks, the store cannot be read, or the daemon dies
while the job runs, the job is SIGKILLed at once (it is pid 1 of its PID
namespace: the whole tree goes) before it can touch a page that will never
come, and :attr:`LazyRestore.failure` says why; the runner then resumes
from the image before (see :mod:`hpcckpt.core.runner.session`).

Unprivileged jobs: the restored tasks open their userfaultfd themselves,
inside the user namespace an unprivileged restore creates. The kernel
allows that only with ``vm.unprivileged_userfaultfd = 1`` (CAP_SYS_PTRACE
in the initial namespace is out of reach there, and CRIU does not ask for
``UFFD_USER_MODE_ONLY``). Where it is 0 (Debian's default), an
unprivileged resume restores streamed instead and logs why
(:func:`lazy_unavailable`).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from hpcckpt import log as hlog
from hpcckpt.criu.engine import Criu, log_excerpt
from hpcckpt.criu.pagemap import PAGE, TaskPages, lazy_ranges, read_pagemaps
from hpcckpt.criu.pageserver import PageServer
from hpcckpt.errors import EngineError, HpcckptError, UsageError
from hpcckpt.image.lazy import LazyPages
from hpcckpt.image.stream import PreparedImage

_log = hlog.get("lazyrestore")

LAZY_CHOICES = ("auto", "on", "off")
UFFD_SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")
_READY_TIMEOUT = 30.0
SOCKET_BUFFER = 8 << 20
SWITCH_INTERVAL = 0.0002
HOT_RUN = 32 << 20  # lazy runs smaller than this are the job's small mappings (see LazyRestore._hot_chunks)


def lazy_unavailable(engine: object, *, euid: int, sysctl: Path = UFFD_SYSCTL) -> str | None:
    """Why a lazy restore cannot run here (a sentence for the log), or None when it can."""
    if not isinstance(engine, Criu):
        return "the checkpoint engine is not CRIU"
    if euid != 0:
        try:
            allowed = sysctl.read_text().strip() == "1"
        except OSError:
            allowed = False
        if not allowed:
            return (f"{sysctl} is not 1, so the restored tasks of an unprivileged job cannot open a "
                    "userfaultfd in their user namespace")
    return None


def wants_lazy(mode: str, threshold: int, memory_bytes: int) -> bool:
    """Policy ``restore.lazy``: ``on``, ``off``, or ``auto`` (at least ``threshold`` bytes of memory)."""
    if mode not in LAZY_CHOICES:
        raise UsageError(f"restore.lazy must be one of {', '.join(LAZY_CHOICES)}, not {mode!r}")
    return mode == "on" or (mode == "auto" and memory_bytes >= threshold)


class _ImagePages:
    """The page server's source: a task's pages by address, from the checked image."""

    def __init__(self, tasks: dict[int, TaskPages], pages: LazyPages) -> None:
        self.tasks = tasks
        self.image = pages

    def pages(self, pid: int, vaddr: int, nr: int) -> list[memoryview]:
        task = self.tasks.get(pid)
        if task is None:
            raise EngineError(f"criu lazy-pages asked for pages of task {pid}, which the image does not hold")
        offset, n = task.locate(vaddr, nr)
        return self.image.read(task.pages_file, offset, n * PAGE)


class LazyRestore:
    """One lazy restore, from preparing its directory until every page is resident (or it failed)."""

    def __init__(self, engine: Criu, prepared: PreparedImage) -> None:
        self.engine = engine
        self.prepared = prepared
        self.dest = prepared.dest
        self.pid: int | None = None
        self.resident = threading.Event()
        self.finished = threading.Event()  # resident, or failed
        self.failure: BaseException | None = None
        self.started = time.monotonic()
        self.resident_s: float | None = None
        self._lock = threading.Lock()
        self._switch: float | None = None
        self._pages = LazyPages(prepared, on_failure=self._fail)
        self._server: PageServer | None = None
        self._daemon: subprocess.Popen[bytes] | None = None
        self._watch: threading.Thread | None = None
        self.tasks = read_pagemaps(self.dest)
        self.lazy_bytes = sum(t.lazy_bytes for t in self.tasks.values())
        self.eager_bytes = 0
        self.hot: list[int] = []

    # -- starting ------------------------------------------------------------------

    def start_daemon(self) -> None:
        """Start ``criu lazy-pages``, write what CRIU's restore reads itself, and start our page server;
        returns once the daemon's socket listens."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _widen(ours)
        status_r, status_w = os.pipe()
        try:
            self._daemon = self.engine.lazy_pages(self.dest, ps_fd=theirs.fileno(), status_fd=status_w)
        finally:
            theirs.close()
            os.close(status_w)
        try:
            # The daemon reads nothing of the images before a restore registers with it: the pages files are
            # written (tens of ms) while it starts up (as long again), not before.
            try:
                self.eager_bytes = self._pages.materialize(lazy_ranges(self.tasks))
                self.hot = self._pages.warm(self._hot_chunks())
            except BaseException:
                self._stop_daemon()
                ours.close()
                raise
            ready, _, _ = select.select([status_r], [], [], _READY_TIMEOUT)
            if not ready or not os.read(status_r, 1):
                self._stop_daemon()
                ours.close()
                raise EngineError("criu lazy-pages did not start",
                                  log_excerpt=log_excerpt(self.dest / "lazy-pages.log"),
                                  hint="see 'hpcckpt doctor'; set restore.lazy: off to restore streamed")
        finally:
            os.close(status_r)
        source = _ImagePages(self.tasks, self._pages)
        self._server = PageServer(ours, source, on_failure=self._fail).start()

    def _hot_chunks(self) -> list[int]:
        """The chunks holding the job's small lazy mappings (heap, allocator arenas, libraries' data).

        A job touches those first, scattered over them, one fault after the other, each waiting for its
        chunk to be read and checked; its large arrays it touches later or in order. Measured (numpy job,
        256 MiB): 11 MiB of runs under HOT_RUN in 4 of 68 chunks (the first and the last three), all of
        the faults before its next progress.
        """
        weight: dict[int, int] = {}  # chunk -> bytes of small lazy runs in it
        for task in self.tasks.values():
            if task.pages_file not in self._pages.sections:
                continue
            for run in task.runs:
                size = run.pages * PAGE
                if not run.lazy or size >= HOT_RUN:
                    continue
                at, end = run.offset, run.offset + size
                while at < end:
                    g = self._pages.chunk_index(task.pages_file, at)
                    upto = min(end, self._pages.chunk_end(g))
                    weight[g] = weight.get(g, 0) + upto - at
                    at = upto
        return sorted(weight, key=lambda g: -weight[g])

    def attach(self, pid: int) -> None:
        """The restore succeeded: the job is ``pid``. Starts the prefetch and the watch for the end."""
        with self._lock:
            self.pid = pid
            failed = self.failure
        if failed is not None:  # failed while criu was still restoring: the job never gets to run
            self._kill()
        # A fault waits on our page server's thread; with Python's default 5 ms switch interval it would wait
        # that long for the interpreter whenever another thread (the runner setting up, the prefetch hashing)
        # holds it. Measured: see docs/performance.md. Set back once every page is in.
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        # Not before: reading and checking chunks while CRIU restores slowed the restore itself on 2 cores
        # (45-55 ms -> 65-90 ms) for no gain in the time to the job's next progress.
        self._pages.start_prefetch()
        self._watch = threading.Thread(target=self._wait_daemon, name="hpcckpt-lazy-watch", daemon=True)
        self._watch.start()
        hlog.event(_log, "lazy.started", f"job running while {self.lazy_bytes >> 20} MiB of memory comes on demand",
                   pid=pid, lazy_bytes=self.lazy_bytes, eager_bytes=self.eager_bytes, hot_chunks=len(self.hot))

    # -- failure and the end ---------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = exc
        hlog.event(_log, "lazy.failed", f"lazy restore failed while the job ran: {exc}; the job is killed", 40,
                   pid=self.pid)
        self._kill()
        self.finished.set()

    def _kill(self) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # pid 1 of its namespace: the kernel ends the whole tree
        self._stop_daemon()

    def _stop_daemon(self) -> None:
        if self._daemon is not None and self._daemon.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._daemon.pid, signal.SIGKILL)

    def _wait_daemon(self) -> None:
        assert self._daemon is not None and self._server is not None
        rc = self._daemon.wait()
        self._server.join(10)
        if rc == 0 and self._server.error is None and self._pages.error is None:
            self.resident_s = time.monotonic() - self.started
            hlog.event(_log, "lazy.resident", f"all pages resident after {self.resident_s:.2f} s", pid=self.pid,
                       seconds=round(self.resident_s, 3), requests=self._server.requests,
                       prefetched=self._pages.prefetched, source_s=round(self._server.source_s, 3),
                       send_s=round(self._server.send_s, 3))
            self.resident.set()
            self.finished.set()
            self._cleanup()
            return
        why = self._server.error or self._pages.error
        self._fail(why if why is not None else EngineError(
            f"criu lazy-pages exited with status {rc} before every page was resident",
            log_excerpt=log_excerpt(self.dest / "lazy-pages.log")))
        self._cleanup()

    def wait_resident(self, timeout: float | None = None) -> bool:
        """Wait until every page is resident (True) or the lazy restore failed or time ran out (False)."""
        self.finished.wait(timeout)
        return self.resident.is_set()

    def _cleanup(self) -> None:
        if self._switch is not None:
            sys.setswitchinterval(self._switch)
            self._switch = None
        if self._server is not None:
            self._server.close()
        self._pages.close()
        self.prepared.close()
        shutil.rmtree(self.dest, ignore_errors=True)

    def abort(self) -> None:
        """The restore itself failed (or was not started): stop everything and remove the directory."""
        with self._lock:
            if self.failure is None:
                self.failure = EngineError("the lazy restore was abandoned")
        self._kill()
        if self._daemon is not None:
            self._daemon.wait()
        self.finished.set()
        self._cleanup()


def _widen(sock: socket.socket) -> None:
    """Room for a whole answer (the daemon asks for at most 4 MiB) in the socket, so the daemon reads it
    in one go rather than a send buffer at a time. Measured on 1 GiB: resident 2.04 s with the default
    (208 KiB), see docs/performance.md."""
    for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            return


def describe_failure(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, HpcckptError) else f"{type(exc).__name__}: {exc}"


def begin(engine: object, prepared: PreparedImage, *, mode: str, threshold: int) -> LazyRestore | None:
    """A started lazy restore of ``prepared`` when policy and node allow it, else None (restore streamed).

    Its daemon listens in the restore directory; the caller runs ``criu
    restore --lazy-pages`` next, then :meth:`LazyRestore.attach` (or
    :meth:`LazyRestore.abort` if the restore failed), and from then on the
    session owns the directory and the prepared image.
    """
    memory = prepared.streamed_bytes
    if not wants_lazy(mode, threshold, memory):
        return None
    why = lazy_unavailable(engine, euid=os.geteuid())
    if why is not None:
        hlog.event(_log, "lazy.unavailable", f"restoring streamed, not lazily: {why}", 30)
        return None
    assert isinstance(engine, Criu)
    session: LazyRestore | None = None
    try:
        session = LazyRestore(engine, prepared)
        session.start_daemon()
    except HpcckptError as err:
        # Nothing of the job runs yet: a streamed restore of the same checked image is as good.
        hlog.event(_log, "lazy.not_started", f"restoring streamed, not lazily: {err}", 30,
                   excerpt=getattr(err, "log_excerpt", ""))
        if session is not None:
            session._pages.close()
            session._stop_daemon()
        return None
    return session
