"""The runner's main loop: one thread decides everything, so no two dumps overlap.

The loop sleeps in ``select`` on three things: a self-pipe that signal
handlers and the flusher write to (``signal.set_wakeup_fd``, so SIGCHLD,
SIGTERM and a finished flush wake it at once), the control socket, and the
time of the next periodic checkpoint. A periodic checkpoint only *dumps* on
this thread (the job is frozen for that long); packing and publishing run on
the flusher's thread (:mod:`hpcckpt.core.checkpoint`), so a signal that arrives
while an image is being published is handled at once. Two more threads copy
the job's stdout and stderr pipes onto the runner's own.

Signals (:class:`SignalPlan`, caught by :class:`SignalQueue` from before the
job is started or restored, so none is lost in between):

* the preemption signals (policy ``preemption.signals``, default TERM and
  USR1) take a final checkpoint within the deadline *counted from the
  signal's arrival*, end the job, and make the runner exit with 85
  (``EXIT_REQUEUE``). If no image could be committed in time the job is still
  ended (the scheduler is taking the node) and the runner exits 85 if an
  older image exists, else 128+signal.
* every other catchable signal is passed on to the job. The job is pid 1 of
  its namespace, and the kernel drops signals to a namespace's init that it
  has no handler for; so when the job does not catch a signal whose default
  is to terminate, the runner delivers it to the rest of the tree and ends
  the job itself, reporting 128+signal as a shell would.

Exit status: the job's own; 128+N if it was killed by signal N; 85 after a
checkpoint-and-stop.

The same loop drives every engine (:mod:`hpcckpt.core.runner.engines`): CRIU's
pipeline above, or an app engine (``files``, ``api``) whose program
checkpoints itself; an engine that learns of commits by looking (the
catalog, the restart files) sets ``poll_s`` and the loop wakes that often.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.core.checkpoint import CheckpointResult, CriuCheckpointer, signal_tree
from hpcckpt.core.pipeline.flush import FlushResult
from hpcckpt.core.runner.control import ControlServer, reply
from hpcckpt.core.runner.engines import CriuEngine, JobEngine
from hpcckpt.criu import procinfo
from hpcckpt.errors import HpcckptError
from hpcckpt.exitcodes import EXIT_REQUEUE, EXIT_STORE

_log = hlog.get("runner")

# Signals the runner passes on: what a batch system or a user sends a job.
FORWARDED = ("HUP", "INT", "QUIT", "USR1", "USR2", "ALRM", "TERM", "CONT", "TSTP", "WINCH", "XCPU")
# Default action "terminate" (or core): a pid-1 job without a handler would ignore these.
_TERMINATING = {"HUP", "INT", "QUIT", "USR1", "USR2", "ALRM", "TERM", "XCPU"}


def signum(name: str) -> int:
    name = name.upper().removeprefix("SIG")
    return int(getattr(signal, f"SIG{name}"))


def exit_status(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def catches(pid: int, sig: int) -> bool:
    """Whether task ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


@dataclass
class SignalPlan:
    preempt: set[int]
    forward: set[int] = field(default_factory=set)

    @classmethod
    def from_names(cls, preempt: list[str]) -> SignalPlan:
        pre = {signum(n) for n in preempt}
        fwd = {signum(n) for n in FORWARDED} - pre
        return cls(pre, fwd)


class SignalQueue:
    """Catches the plan's signals (and SIGCHLD) into a queue of (signal, arrival time).

    Installed before the job is started or restored: a preemption signal
    that arrives while CRIU is restoring is then handled as soon as the loop
    runs, with its deadline counted from when it came. Handlers only append
    (the interpreter runs them between bytecodes of the main thread) and the
    wake-up fd makes ``select`` return.
    """

    def __init__(self, plan: SignalPlan) -> None:
        self.plan = plan
        self.pending: list[tuple[int, float]] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in [*self.plan.preempt, *self.plan.forward, signal.SIGCHLD]:
            self._old[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, _frame: Any) -> None:
        if sig != signal.SIGCHLD:
            self.pending.append((sig, time.monotonic()))

    def wake(self) -> None:
        """From any thread: make the loop's ``select`` return."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"\0")

    def drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 512):
                pass

    def restore(self) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        self._old.clear()
        signal.set_wakeup_fd(-1)


class OutputPump(threading.Thread):
    """Copies one of the job's pipes onto one of our descriptors until EOF."""

    def __init__(self, src: int, dst: int, name: str) -> None:
        super().__init__(name=f"pump-{name}", daemon=True)
        self.src, self.dst = src, dst

    def run(self) -> None:
        try:
            while True:
                data = os.read(self.src, 1 << 16)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    try:
                        n = os.write(self.dst, view)
                    except BlockingIOError:
                        time.sleep(0.01)
                        continue
                    except OSError:
                        return  # our own output is gone; the job must not block on it, so keep reading
                    view = view[n:]
        finally:
            with contextlib.suppress(OSError):
                os.close(self.src)


@dataclass
class RunnerConfig:
    job_id: str
    interval: Callable[[list[float]], float | None]  # recent checkpoint costs -> next interval (None: never)
    deadline_s: float  # time allowed for a final checkpoint after a preemption signal
    signals: SignalPlan
    async_flush: bool = True  # policy pipeline.async_flush: False waits for each flush on the loop


class Runner:
    """Drives one job under any engine (:mod:`hpcckpt.core.runner.engines`): a CriuCheckpointer, or an app engine."""

    def __init__(self, cfg: RunnerConfig, checkpointer: CriuCheckpointer | JobEngine, control: ControlServer | None,
                 signals: SignalQueue | None = None) -> None:
        self.cfg = cfg
        self.engine: JobEngine = (CriuEngine(checkpointer) if isinstance(checkpointer, CriuCheckpointer)
                                  else checkpointer)
        self.control = control
        self.signals = signals or SignalQueue(cfg.signals)
        self.engine.notify = self.signals.wake
        self.pid = -1
        self.pumps: list[OutputPump] = []
        self.costs: list[float] = []
        self.last: CheckpointResult | None = None
        self.committed_any = False
        self._waiting: dict[str, socket.socket] = {}  # staged dump -> control connection awaiting its commit
        self._forced_status: int | None = None
        #: The job ended by itself (exit or a signal it did not survive), not stopped by us after a checkpoint.
        self.ended_on_its_own = False
        # The job died because we ended it (hpcckpt.core.runner.lazywatch): the job restored anew, as
        # (pid, stdout read end, stderr read end), or None to report its exit as usual.
        self.relaunch: Callable[[], tuple[int, int, int] | None] | None = None

    @property
    def ckpt(self) -> CriuCheckpointer:
        """The CRIU pipeline (what the lazy-restore watch and the session reach into); criu engine only."""
        assert isinstance(self.engine, CriuEngine), f"the {self.engine.name} engine has no CRIU CriuCheckpointer"
        return self.engine.ckpt

    # -- set-up --------------------------------------------------------------

    def install_signals(self) -> None:
        """Before the job starts (if the queue was not installed earlier): no signal may be lost."""
        if not self.signals._old:
            self.signals.install()

    def attach(self, pid: int, out_r: int, err_r: int) -> None:
        self.pid = pid
        self.pumps = [OutputPump(out_r, 1, "stdout"), OutputPump(err_r, 2, "stderr")]
        for p in self.pumps:
            p.start()

    def restore_signals(self) -> None:
        self.signals.restore()

    # -- the loop ------------------------------------------------------------

    def loop(self) -> int:
        try:
            code = self._loop()
        except BaseException:
            self._end_pipeline(job_ended=True)
            raise
        self._end_pipeline(job_ended=True)
        return code

    def _loop(self) -> int:
        sel = selectors.DefaultSelector()
        sel.register(self.signals.wake_r, selectors.EVENT_READ, "wake")
        if self.control is not None:
            sel.register(self.control.fileno(), selectors.EVENT_READ, "control")
        interval = self.cfg.interval(self.costs)
        next_at = time.monotonic() + interval if interval else None
        try:
            while True:
                self._collect()
                status = self._reap()
                if status is not None and self._relaunched():
                    continue
                if status is not None:
                    return self._finish(status)
                while self.signals.pending:
                    sig, arrived = self.signals.pending.pop(0)
                    code = self._handle_signal(sig, arrived)
                    if code is not None:
                        return code
                timeout = None if next_at is None else max(0.0, next_at - time.monotonic())
                poll = self.engine.poll_s
                if poll is not None:  # an engine that learns of commits by looking (the catalog, the files)
                    timeout = poll if timeout is None else min(timeout, poll)
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        self.signals.drain_wakeups()
                    elif key.data == "control" and self.control is not None:
                        code = self._serve()
                        if code is not None:
                            return code
                if next_at is not None and time.monotonic() >= next_at and self._reap(peek=True) is None:
                    self._periodic()
                    interval = self.cfg.interval(self.costs)
                    next_at = time.monotonic() + interval if interval else None
        finally:
            sel.close()

    def _reap(self, peek: bool = False) -> int | None:
        if self._forced_status is not None and not peek:
            return self._forced_status
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 0 if self._forced_status is None else self._forced_status
        if pid == 0:
            return None
        self._forced_status = status
        return status

    def _relaunched(self) -> bool:
        """The job was ended by us (a lazy restore that failed): ``relaunch`` brought it back another way."""
        if self.relaunch is None:
            return False
        new = self.relaunch()
        if new is None:
            return False
        self._join_pumps()
        self._forced_status = None
        self.attach(*new)
        return True

    def _finish(self, status: int) -> int:
        code = exit_status(status)
        self.ended_on_its_own = True
        self._join_pumps()
        hlog.event(_log, "runner.job_exited", f"job {self.cfg.job_id} ended with status {code}",
                   job_id=self.cfg.job_id, status=code)
        return code

    def _join_pumps(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        for p in self.pumps:
            p.join(max(0.0, end - time.monotonic()))

    def _end_pipeline(self, *, job_ended: bool) -> None:
        """The job is over: let the flush in flight finish within the deadline, else leave it to the epilog."""
        done = self.engine.finish(self.cfg.deadline_s, job_ended=job_ended)
        if not done:
            hlog.event(_log, "runner.flush_abandoned", "the flush in flight did not finish in "
                       f"{self.cfg.deadline_s:.0f} s after the job ended; aborted", 30)
        self._collect()
        for stage, conn in list(self._waiting.items()):
            with contextlib.suppress(OSError):
                reply(conn, {"ok": False, "error": "the job ended before its checkpoint was flushed",
                             "exit_code": EXIT_STORE, "stage": stage})
        self._waiting.clear()
        self.engine.cleanup_staging()

    # -- checkpoints ---------------------------------------------------------

    def _collect(self) -> None:
        """Results of background flushes: remember the last commit, answer who waits for it."""
        for res in self.engine.collect():
            self._record(res)

    def _record(self, res: CheckpointResult | FlushResult) -> None:
        if isinstance(res, CheckpointResult):
            self.last = res
            self.committed_any = True
            doc: dict[str, Any] = {"ok": True, **res.to_dict()}
        else:
            doc = {"ok": False, "error": res.error or "flush failed", "exit_code": EXIT_STORE}
        conn = self._waiting.pop(res.stage, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                reply(conn, doc)

    def _periodic(self) -> None:
        try:
            if not self.cfg.async_flush:
                res = self.engine.checkpoint(self.pid)
                self.costs = [*self.costs[-9:], res.frozen_s]
                self._record(res)
                return
            taken = self.engine.take(self.pid)
            if taken is not None:
                # What the job pays is the freeze; the flush runs beside it.
                self.costs = [*self.costs[-9:], taken.frozen_s]
        except HpcckptError as err:
            hlog.event(_log, "runner.checkpoint_failed", f"periodic checkpoint failed: {err}; "
                       "the job goes on, and the previous image stays the latest", 40)

    def _take_final(self, deadline: float | None, *, thaw_on_failure: bool) -> CheckpointResult:
        res = self.engine.checkpoint(self.pid, final=True, deadline=deadline, thaw_on_failure=thaw_on_failure)
        self._collect()
        self.last = res
        self.committed_any = True
        return res

    def stop_after_checkpoint(self, deadline: float | None) -> tuple[CheckpointResult | None, str]:
        """The final checkpoint; the job is ended whatever happens. Returns (result, error)."""
        try:
            res: CheckpointResult | None = self._take_final(deadline, thaw_on_failure=False)
            err = ""
        except HpcckptError as exc:
            res, err = None, str(exc)
            hlog.event(_log, "runner.final_failed", f"final checkpoint failed: {exc}; ending the job anyway", 40)
            signal_tree(list(reversed(procinfo.tree_pids(self.pid))), signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            _pid, status = os.waitpid(self.pid, 0)
            self._forced_status = status
        self._join_pumps()
        return res, err

    def _handle_signal(self, sig: int, arrived: float) -> int | None:
        name = signal.Signals(sig).name
        if sig in self.cfg.signals.preempt:
            deadline = arrived + self.cfg.deadline_s
            hlog.event(_log, "runner.preempted", f"{name}: final checkpoint of job {self.cfg.job_id} within "
                       f"{max(0.0, deadline - time.monotonic()):.1f} s, then stop", signal=name,
                       in_flight=self.engine.in_flight())
            res, _err = self.stop_after_checkpoint(deadline)
            if res is not None or self.committed_any or self._has_older():
                return EXIT_REQUEUE
            return 128 + sig
        self._forward(sig)
        return None

    def _has_older(self) -> bool:
        return self.engine.has_image()

    def _forward(self, sig: int) -> None:
        name = signal.Signals(sig).name.removeprefix("SIG")
        if catches(self.pid, sig) or name not in _TERMINATING:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            return
        hlog.event(_log, "runner.signal_kill", f"the job does not handle SIG{name}; ending it as the default "
                   "action would", signal=name)
        pids = procinfo.tree_pids(self.pid)
        signal_tree(pids[1:], sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._forced_status = sig  # reported as killed by sig: 128+sig

    # -- control requests ----------------------------------------------------

    def _status(self) -> dict[str, Any]:
        return {"ok": True, "job_id": self.cfg.job_id, "pid": self.pid,
                "last": None if self.last is None else self.last.to_dict(),
                "in_flight": self.engine.in_flight(), **self.engine.describe()}

    def _serve(self) -> int | None:
        assert self.control is not None
        got = self.control.accept()
        if got is None:
            return None
        conn, req = got
        op = req.get("op")
        if op == "status":
            reply(conn, self._status())
            return None
        if op != "checkpoint":
            reply(conn, {"ok": False, "error": f"unknown op {op!r}", "exit_code": 2})
            return None
        if req.get("stop"):
            deadline = req.get("deadline")
            dl = time.monotonic() + float(deadline) if isinstance(deadline, (int, float)) else None
            try:
                res = self._take_final(dl, thaw_on_failure=True)
            except HpcckptError as err:  # --and-stop that failed: the job was thawed and runs on
                reply(conn, {"ok": False, "error": str(err), "exit_code": err.exit_code,
                             "excerpt": getattr(err, "log_excerpt", "")})
                return None
            with contextlib.suppress(ChildProcessError):
                _pid, status = os.waitpid(self.pid, 0)
                self._forced_status = status
            self._join_pumps()
            reply(conn, {"ok": True, "stopped": True, **res.to_dict()})
            return EXIT_REQUEUE
        try:
            if not self.cfg.async_flush:
                reply(conn, {"ok": True, **self.engine.checkpoint(self.pid).to_dict()})
                return None
            taken = self.engine.request(self.pid)
        except HpcckptError as err:
            reply(conn, {"ok": False, "error": str(err), "exit_code": err.exit_code,
                         "excerpt": getattr(err, "log_excerpt", "")})
            return None
        if taken is None:
            reply(conn, {"ok": False, "exit_code": EXIT_STORE, "error": "two checkpoints are already in flight "
                         f"({', '.join(self.engine.in_flight())}); try again once they are flushed"})
            return None
        # Answered from _collect() once this dump is committed; the loop goes on meanwhile.
        self._waiting[taken.key] = conn
        return None
