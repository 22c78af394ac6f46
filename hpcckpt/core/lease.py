"""One live copy per job: the lease a runner holds in the catalog while it runs the job.

``hpcckpt run`` and ``hpcckpt resume`` take the job's lease before they start
or restore anything, renew it while the job runs, and let go of it when the
run ends, saying how (:class:`~hpcckpt.catalog.model.LeaseState`). A second
runner of a live job is refused (:class:`~hpcckpt.errors.JobRunningError`,
exit 15), with where the job runs.

A lease whose holder is provably dead is taken over (:func:`judge`, pure):

* on the same machine (same hostname *and* boot id), the pid decides: the
  holder is alive while a process with its pid and its start time exists.
  Several Slurm nodes may share one host, so the host, not the node name,
  says where a pid means something;
* a later run of our own Slurm job (a requeue: a higher restart count) takes
  over from an earlier one, wherever that ran: Slurm says it is over;
* elsewhere, Slurm decides when the holder ran in a Slurm job: a job Slurm no
  longer knows, no longer runs, or has requeued since (its restart count grew)
  is dead;
* otherwise, and whenever Slurm cannot be asked, the lease's expiry decides.
  Runners renew every third of the TTL, so a live one never lapses.

Taking is a compare-and-swap on the row's token (:meth:`Catalog.swap_lease`):
two runners that judged the same row free cannot both win, whatever the
backend; the loser reads the winner's lease and is refused.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog
from hpcckpt.catalog.model import LeaseRecord, LeaseState
from hpcckpt.context import node_name
from hpcckpt.errors import CatalogError, HpcckptError, JobRunningError, NotFoundError, SlurmError
from hpcckpt.slurm.adapter import ScontrolAdapter

_log = hlog.get("lease")

DEFAULT_TTL_S = 90.0
# Slurm job states in which the job's processes may still run.
SLURM_ALIVE = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING",
                         "STAGE_OUT"})


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22); None if there is none.

    A pid with another start time is another process: the holder died and its pid was reused.
    """
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            raw = fh.read()
    except (OSError, ValueError):
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    try:
        if rest[0] in ("Z", "X"):  # a zombie runs nothing
            return None
        return int(rest[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Holder:
    """Who asks for the lease: this runner, where it runs."""

    node: str
    host: str
    boot_id: str
    pid: int
    pid_start: int
    slurm_job_id: str | None = None
    slurm_step: str | None = None
    restart_count: int = 0

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> Holder:
        env = os.environ if environ is None else environ
        try:
            restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
        except ValueError:
            restarts = 0
        pid = os.getpid()
        return cls(node=node_name(), host=socket.gethostname(), boot_id=boot_id(), pid=pid,
                   pid_start=process_start(pid) or 0,
                   slurm_job_id=env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None,
                   slurm_step=env.get("SLURM_STEP_ID") or None, restart_count=restarts)

    def same_machine(self, lease: LeaseRecord) -> bool:
        # A hostname alone could be shared by two machines (containers); the boot id could not.
        return bool(lease.host) and lease.host == self.host and bool(lease.boot_id) and lease.boot_id == self.boot_id


class Probes(Protocol):
    """What :func:`judge` may ask about the world (fakes in unit tests)."""

    def pid_start(self, pid: int) -> int | None:
        """The start time of ``pid`` on this machine, None if no such live process."""

    def slurm_job(self, job_id: str) -> dict[str, str] | None:
        """``scontrol show job`` fields; None if Slurm does not know the job. Raises SlurmError if unreachable."""


class SystemProbes:
    """The real answers: /proc, and Slurm through its adapter (asked only when a lease is elsewhere)."""

    def __init__(self, slurm: Callable[[], Any] | None = None) -> None:
        self._slurm_factory = slurm
        self._slurm: Any = None

    def pid_start(self, pid: int) -> int | None:
        return process_start(pid)

    def slurm_job(self, job_id: str) -> dict[str, str] | None:
        if self._slurm is None:
            if self._slurm_factory is not None:
                self._slurm = self._slurm_factory()
            else:
                self._slurm = ScontrolAdapter(timeout=10.0)
        try:
            return dict(self._slurm.show_job(job_id))
        except NotFoundError:
            return None


@dataclass(frozen=True)
class Verdict:
    free: bool
    reason: str


def judge(lease: LeaseRecord | None, here: Holder, now: float, probes: Probes) -> Verdict:
    """Whether ``here`` may take the job's lease, and why (or why not): the whole decision, no side effects."""
    if lease is None:
        return Verdict(True, "the job has no lease yet")
    if lease.state is not LeaseState.LIVE:
        return Verdict(True, f"its last run {lease.state.value}")
    if (lease.slurm_job_id and lease.slurm_job_id == here.slurm_job_id
            and here.restart_count > lease.restart_count):
        # Slurm runs this job again (requeued): whatever is left of its earlier run is not the job any more.
        return Verdict(True, f"it was held by an earlier run (restart {lease.restart_count}) of this Slurm job")
    if here.same_machine(lease):
        start = probes.pid_start(lease.pid)
        if start is None:
            return Verdict(True, f"its runner, pid {lease.pid} on {lease.host}, is gone")
        if lease.pid_start and start != lease.pid_start:
            return Verdict(True, f"its runner, pid {lease.pid} on {lease.host}, is gone (the pid is another "
                                 "process now)")
        return Verdict(False, "its runner is alive on this machine")
    if lease.slurm_job_id:
        try:
            job = probes.slurm_job(lease.slurm_job_id)
        except (SlurmError, HpcckptError) as err:
            job = {"_unknown": str(err)}
        if job is None:
            return Verdict(True, f"Slurm no longer knows job {lease.slurm_job_id}")
        if "_unknown" not in job:
            state = job.get("JobState", "").split("+")[0].upper()
            if state and state not in SLURM_ALIVE:
                return Verdict(True, f"Slurm job {lease.slurm_job_id} is {state}")
            try:
                restarts = int(job.get("Restarts", "0") or 0)
            except ValueError:
                restarts = 0
            if restarts > lease.restart_count:
                return Verdict(True, f"Slurm job {lease.slurm_job_id} was requeued since")
    if lease.expires <= now:
        return Verdict(True, f"its lease expired {now - lease.expires:.0f} s ago (its runner stopped renewing it)")
    return Verdict(False, "its lease is current")


def where(lease: LeaseRecord) -> str:
    """Where a lease's holder runs, for messages."""
    text = f"runner pid {lease.pid} on node {lease.node or lease.host}"
    if lease.host and lease.host != lease.node:
        text += f" (host {lease.host})"
    if lease.slurm_job_id:
        text += f", Slurm job {lease.slurm_job_id}" + (f" step {lease.slurm_step}" if lease.slurm_step else "")
    return text


def _stamp(t: float | None) -> str:
    return "?" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def running_error(job_id: str, lease: LeaseRecord, now: float) -> JobRunningError:
    return JobRunningError(
        f"job {job_id} is already running: {where(lease)}, since {_stamp(lease.acquired)} "
        f"(lease renewed {max(0.0, now - lease.renewed):.0f} s ago)",
        hint=f"only one copy of a job may run. Wait for it to end, or stop it with 'hpcckpt checkpoint {job_id} "
             "--and-stop' on its node. A runner that died is taken over at once on its own machine, elsewhere "
             f"once Slurm says its job ended or its lease expires ({_stamp(lease.expires)})",
    )


@dataclass
class Lease:
    """A lease we hold. ``previous`` is the row we took over (None: the job had none)."""

    catalog: Catalog
    record: LeaseRecord
    previous: LeaseRecord | None
    ttl: float
    clock: Callable[[], float] = time.time
    _keeper: LeaseKeeper | None = field(default=None, repr=False)
    ended: bool = False

    @property
    def job_id(self) -> str:
        return self.record.job_id

    def keep(self, opener: Callable[[], Catalog] | None = None) -> None:
        """Renew the lease from a thread of its own (its own catalog connection) until released.

        A thread, not the runner's loop: a long dump must not let the lease lapse.
        """
        if self._keeper is None:
            self._keeper = LeaseKeeper(self, opener or (lambda: self.catalog))
            self._keeper.start()

    def lost(self) -> bool:
        return self._keeper is not None and self._keeper.lost

    def release(self, state: LeaseState, *, exit_status: int | None = None) -> None:
        """Let go, recording how the run ended. Errors are logged: the job's end must not fail on the catalog."""
        self._stop_keeper()
        if self.ended:
            return
        self.ended = True
        ended = self.clock()
        try:
            ours = self.catalog.end_lease(self.job_id, self.record.token, state=state, exit_status=exit_status,
                                          ended=ended, uid=self.record.uid)
        except HpcckptError as err:
            hlog.event(_log, "lease.release_failed", f"could not release the lease of job {self.job_id}: {err}; "
                       "the next run takes it over once this runner is seen dead", 30, job_id=self.job_id)
            return
        if not ours:
            hlog.event(_log, "lease.lost", f"the lease of job {self.job_id} was taken over by another runner "
                       "while this one ran", 40, job_id=self.job_id)

    def give_back(self) -> None:
        """Undo the take: the run never started (a refused or failed restore). The row says what it said."""
        self._stop_keeper()
        if self.ended:
            return
        self.ended = True
        prev = self.previous
        try:
            if prev is None:
                self.catalog.end_lease(self.job_id, self.record.token, state=LeaseState.STOPPED,
                                       uid=self.record.uid)
            else:
                # A live previous holder was dead (so we judged): what it left is a stopped run.
                back = replace(prev, state=LeaseState.STOPPED) if prev.state is LeaseState.LIVE else prev
                self.catalog.swap_lease(back, expect_token=self.record.token)
        except HpcckptError as err:
            hlog.event(_log, "lease.release_failed", f"could not give back the lease of job {self.job_id}: {err}",
                       30, job_id=self.job_id)

    def _stop_keeper(self) -> None:
        if self._keeper is not None:
            self._keeper.stop()


class LeaseKeeper(threading.Thread):
    def __init__(self, lease: Lease, opener: Callable[[], Catalog]) -> None:
        super().__init__(name="hpcckpt-lease", daemon=True)
        self.lease = lease
        self.opener = opener
        self.lost = False
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(10)

    def run(self) -> None:
        rec = self.lease.record
        period = max(0.05, self.lease.ttl / 3)
        cat: Catalog | None = None
        try:
            while not self._stop_event.wait(period):
                try:
                    if cat is None:
                        cat = self.opener()
                    ok = cat.renew_lease(rec.job_id, rec.token, expires=self.lease.clock() + self.lease.ttl,
                                         uid=rec.uid)
                except HpcckptError as err:
                    hlog.event(_log, "lease.renew_failed", f"could not renew the lease of job {rec.job_id}: {err}; "
                               "trying again", 30, job_id=rec.job_id)
                    continue
                if not ok:
                    self.lost = True
                    hlog.event(_log, "lease.lost", f"the lease of job {rec.job_id} is no longer ours: another "
                               "runner judged this one dead and took the job over", 40, job_id=rec.job_id)
                    return
        finally:
            if cat is not None and cat is not self.lease.catalog:
                cat.close()


def acquire(
    catalog: Catalog,
    job_id: str,
    *,
    here: Holder | None = None,
    options: dict[str, Any] | None = None,
    ttl: float = DEFAULT_TTL_S,
    probes: Probes | None = None,
    clock: Callable[[], float] = time.time,
    check: Callable[[LeaseRecord | None], None] | None = None,
    attempts: int = 8,
) -> Lease:
    """Take job ``job_id``'s lease for ``here`` or raise :class:`JobRunningError`.

    ``options``: the run options to record (None keeps the row's). ``check``
    sees the row about to be taken over and may refuse by raising (a
    finished job without ``--force``); nothing is written then.
    """
    me = here or Holder.current()
    look = probes or SystemProbes()
    uid = catalog.user.uid
    for _ in range(attempts):
        prev = catalog.get_lease(job_id, uid=uid)
        now = clock()
        verdict = judge(prev, me, now, look)
        if not verdict.free:
            assert prev is not None
            raise running_error(job_id, prev, now)
        if check is not None:
            check(prev)
        rec = LeaseRecord(
            uid=uid, job_id=str(job_id), user=catalog.user.name, token=secrets.token_hex(16), state=LeaseState.LIVE,
            node=me.node, host=me.host, boot_id=me.boot_id, pid=me.pid, pid_start=me.pid_start,
            slurm_job_id=me.slurm_job_id, slurm_step=me.slurm_step, restart_count=me.restart_count,
            acquired=now, renewed=now, expires=now + ttl, ended=None, exit_status=None,
            options=dict(options if options is not None else (prev.options if prev is not None else {})),
        )
        if catalog.swap_lease(rec, expect_token=None if prev is None else prev.token):
            if prev is not None and prev.state is LeaseState.LIVE:
                hlog.event(_log, "lease.taken_over", f"job {job_id}: took over the lease of {where(prev)}: "
                           f"{verdict.reason}", 30, job_id=job_id, was_pid=prev.pid, was_node=prev.node)
            else:
                hlog.event(_log, "lease.taken", f"job {job_id}: lease taken ({verdict.reason})", 10, job_id=job_id)
            return Lease(catalog, rec, prev, ttl, clock)
    raise CatalogError(f"job {job_id}: the lease changed hands {attempts} times while this runner tried to take it",
                       hint="several runners are starting this job at once; only one may run it")
