"""One job's checkpoints: dump into node-local staging, thaw, flush to the store in the background.

The order is what keeps the job's latest image valid at every instant and
the job's freeze short:

1. Admission (:meth:`CriuCheckpointer.admit`): if a flush is still running and
   policy ``pipeline.on_busy`` says skip (or one already waits), the
   checkpoint is not taken at all, so a slow store costs the job nothing and
   staged dumps never pile up.
2. The task tree and its open files (paths, modes, inodes) are read from
   /proc while the job runs (:func:`hpcckpt.criu.procinfo.snapshot`).
3. ``criu dump --leave-running`` into a fresh staged directory on tmpfs when
   the node has the memory for it, else on node-local disk
   (:func:`hpcckpt.core.pipeline.staging.choose_staging`): the job is frozen for
   CRIU's dump and nothing else. The open files' sizes at the freeze (what
   CRIU checks at restore) are then taken from CRIU's own images
   (:func:`hpcckpt.criu.images.dumped_files`) while the job runs again. A
   *final* checkpoint (preemption, ``--and-stop``) dumps with
   ``--leave-stopped`` instead: the tree stays stopped until its image is
   committed and is then killed (thawed if no image could be committed).
4. ``criu cpuinfo dump`` and the staged metadata, then the completion marker
   (``.done``): from now on the dump is either flushed by us or salvaged by
   the Slurm epilog, never lost and never published twice.
5. The background :class:`~hpcckpt.core.pipeline.flush.Flusher` packs it into the
   store against the previous image (incremental, bounded by
   ``pipeline.full_every`` / ``max_chain_ratio``), compressed per
   ``storage.compression``, and publishes it atomically (temp name, fsync,
   rename, catalog commit last): a reader never takes a half-flushed image.
   Retention runs on the flusher's thread after each commit, so it never
   races a publish whose parent it could delete.

A failed dump gets a catalog row of its own, marked ``failed`` with CRIU's
log excerpt; the job runs on and the previous image stays the latest.

A final checkpoint must be committed before its deadline (a
``time.monotonic()`` value, counted from the signal's arrival): the dump's
timeout is what is left, the staged dump is queued with ``force`` behind the
flush in flight, and if the deadline passes first the flusher is aborted
(its temp file removed, its row failed) and the previous image stays the
latest; the complete staged dumps are left for the epilog when there is one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog
from hpcckpt.context import User, node_name
from hpcckpt.core.launch import scratch
from hpcckpt.core.launch.spawn import needs_user_namespace
from hpcckpt.core.pipeline.flush import Admission, Flusher, FlushResult, FlushSettings, Publisher
from hpcckpt.core.pipeline.predump import PREDUMP_DIR, PreDumpEngine, PreDumpPlan, adopt_parent
from hpcckpt.core.pipeline.staging import TMPFS, StagedCheckpoint, choose_staging, job_rss, staging_candidates
from hpcckpt.criu import images as criuimg
from hpcckpt.criu import netplan, procinfo
from hpcckpt.criu.interface import CheckpointEngine, DumpOptions, DumpResult
from hpcckpt.errors import DeadlineExceededError, ExternalConnectionError, HpcckptError, StoreError
from hpcckpt.fs import safe as fsutil
from hpcckpt.image import ImageMeta, OpenFile, TaskInfo
from hpcckpt.image.refs import ParentIndex
from hpcckpt.jobid import JobIdentity
from hpcckpt.store.images import Store

_log = hlog.get("checkpoint")

# Slurm variables worth keeping in the image: enough to resubmit or explain it later.
_SLURM_KEYS = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_JOB_QOS",
    "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT",
    "SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_CPUS_ON_NODE", "SLURM_SUBMIT_DIR",
)
_ERROR_LIMIT = 4000  # characters of error text kept in the catalog row


@dataclass
class JobInfo:
    """What the pipeline records about the job in every image."""

    identity: JobIdentity
    user: User
    cmdline: list[str]
    cwd: str
    stdio: dict[str, str]  # job fd -> CRIU resource name of the runner's pipe ("pipe:[N]")
    # The interval in force and the inputs that chose it (Daly's for ``auto``), updated by the
    # runner before every checkpoint and recorded in the image for ``hpcckpt info``.
    interval: dict[str, Any] | None
    policy_digest: str = ""
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    # The job's own temporary directories (hpcckpt.core.launch.scratch), made again before it is restored.
    scratch: list[str] = field(default_factory=list)


@dataclass
class Staged:
    """A dump taken and handed to the flusher: what the job paid for it."""

    staged: StagedCheckpoint
    final: bool
    frozen_s: float  # job stopped: the engine's dump, from its start until it returns
    dump_s: float
    staging: str  # "tmpfs" | "disk"
    started: float  # monotonic


@dataclass
class CheckpointResult:
    ckptid: int
    path: Path
    size_bytes: int
    frozen_s: float
    dump_s: float
    pack_s: float  # pack + publish, on the flusher's thread (the job runs meanwhile, except for final ones)
    total_s: float  # from the freeze to the commit
    final: bool
    parent: int | None = None
    chain: str = ""
    bytes_in: int = 0
    ref_bytes: int = 0
    staging: str = ""
    stage: str = ""  # the staged dump it came from

    def to_dict(self) -> dict[str, Any]:
        return {
            "ckptid": self.ckptid, "path": str(self.path), "size_bytes": self.size_bytes,
            "frozen_s": round(self.frozen_s, 3), "dump_s": round(self.dump_s, 3),
            "pack_s": round(self.pack_s, 3), "total_s": round(self.total_s, 3), "final": self.final,
            "parent": self.parent, "chain": self.chain, "bytes_in": self.bytes_in, "ref_bytes": self.ref_bytes,
            "staging": self.staging,
        }


def signal_tree(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError("no time was left before the deadline to start the checkpoint")
    return left


def _files_at_dump(snap: procinfo.TreeSnapshot, dump_dir: Path) -> list[OpenFile]:
    """The job's open files with their sizes at the freeze, from CRIU's images.

    An engine whose dumps are not CRIU images (no pstree.img) records no
    sizes of its own: the snapshot's, taken just before the dump, stand in.
    """
    if not os.path.lexists(dump_dir / "pstree.img"):
        return snap.open_files()
    return procinfo.files_at_dump(snap, criuimg.dumped_files(dump_dir))


Retention = Callable[[Catalog], None]


class CriuCheckpointer:
    """Takes checkpoints of one job into one store and catalog, through staging and a background flush.

    ``catalog`` is the main thread's connection (failure rows); the
    publisher opens its own per thread. ``retention`` is called on the
    flusher's thread with that thread's catalog after each commit.
    """

    def __init__(
        self,
        *,
        engine: CheckpointEngine,
        store: Store,
        catalog: Catalog,
        job: JobInfo,
        options: DumpOptions,
        flush: FlushSettings,
        publisher: Publisher,
        disk_staging: Path | None,
        tmpfs: Path | None = TMPFS,
        parent: ParentIndex | None = None,
        retention: Retention | None = None,
        node: str | None = None,
        predump: PreDumpPlan | None = None,
        epilog_salvages: bool = False,
        external_connections: str = "close",
        scratch_limit: int = 0,
        after_attempt: Callable[[Catalog], None] | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.catalog = catalog
        self.job = job
        self.options = options
        self.settings = flush
        self.publisher = publisher
        self.disk_staging = disk_staging
        self.tmpfs = tmpfs
        self.retention = retention
        self.node = node or node_name()
        self.predump = predump or PreDumpPlan(False, "not probed")
        # Under Slurm the epilog publishes complete staged dumps the runner could not flush in time.
        self.epilog_salvages = epilog_salvages
        self.external_connections = external_connections
        self.scratch_limit = scratch_limit
        # Called with a catalog connection of the calling thread after each attempt (metrics refresh).
        self.after_attempt = after_attempt
        self._lock = threading.Condition()
        self._taken: dict[str, Staged] = {}
        self._done: dict[str, CheckpointResult | FlushResult] = {}
        self._fresh: list[CheckpointResult | FlushResult] = []
        self.notify: Callable[[], None] = lambda: None  # the runner's wake-up: a result is ready
        # Waits (until a deadline) for a lazily restored job's memory to be all in; raises if it cannot be.
        self.resident: Callable[[float | None], None] | None = None
        self.flusher = self._new_flusher(parent)
        if self.predump.enabled and not isinstance(engine, PreDumpEngine):
            self.predump = PreDumpPlan(False, f"the {engine.name} engine has no pre-dump")
        if self.predump.enabled:
            hlog.event(_log, "checkpoint.predump", f"pre-dump with memory tracking is on ({self.predump.reason}): "
                       "the job is frozen only to write what changed since each pre-dump", 20)

    # -- the flusher -----------------------------------------------------------

    def _new_flusher(self, parent: ParentIndex | None) -> Flusher:
        return Flusher(self.publisher, self.settings, parent=parent, on_done=self._on_flushed)

    def _on_flushed(self, fr: FlushResult) -> None:
        """On the flusher's thread: log the commit, apply retention, wake the runner."""
        with self._lock:
            taken = self._taken.pop(fr.stage, None)
        out: CheckpointResult | FlushResult = fr
        if fr.ok and fr.ckptid is not None and fr.path is not None:
            try:
                size = fr.path.stat().st_size
            except OSError:
                size = fr.bytes_out
            now = time.monotonic()
            out = CheckpointResult(
                ckptid=fr.ckptid, path=fr.path, size_bytes=size, frozen_s=taken.frozen_s if taken else 0.0,
                dump_s=taken.dump_s if taken else 0.0, pack_s=fr.seconds,
                total_s=now - taken.started if taken else fr.seconds, final=bool(taken and taken.final),
                parent=fr.parent, chain=fr.chain, bytes_in=fr.bytes_in, ref_bytes=fr.ref_bytes,
                staging=taken.staging if taken else "", stage=fr.stage,
            )
            hlog.event(_log, "checkpoint.committed", f"checkpoint {fr.ckptid} of job {self.job.identity.job_id} "
                       "committed", job_id=self.job.identity.job_id, **out.to_dict())
            if self.retention is not None:
                try:
                    self.retention(self._thread_catalog())
                except (HpcckptError, OSError) as err:  # a full store must not fail a good checkpoint
                    hlog.event(_log, "checkpoint.retention_failed", f"retention failed: {err}", 30)
        else:
            hlog.event(_log, "checkpoint.publish_failed", f"checkpoint of job {self.job.identity.job_id} was not "
                       f"published: {fr.error}; the previous image stays the latest", 40, stage=fr.stage)
        self._attempted(self._thread_catalog())
        with self._lock:
            self._done[fr.stage] = out
            self._fresh.append(out)
            self._lock.notify_all()
        self.notify()

    def _thread_catalog(self) -> Catalog:
        opener = getattr(self.publisher, "catalog", None)
        return opener() if callable(opener) else self.catalog

    def collect(self) -> list[CheckpointResult | FlushResult]:
        """Results (committed or failed) that arrived since the last call, oldest first."""
        with self._lock:
            out, self._fresh = self._fresh, []
        return out

    def wait(self, stage: str, deadline: float | None) -> CheckpointResult | FlushResult | None:
        """The result of staged dump ``stage``; None if ``deadline`` passed first."""
        with self._lock:
            ok = self._lock.wait_for(
                lambda: stage in self._done,
                None if deadline is None else max(0.0, deadline - time.monotonic()),
            )
            return self._done.pop(stage) if ok else None

    def admit(self) -> Admission:
        return self.flusher.admit()

    @property
    def parent(self) -> ParentIndex | None:
        return self.flusher.parent

    def in_flight(self) -> list[str]:
        return [s.name for s in self.flusher.in_flight()]

    # -- helpers -------------------------------------------------------------

    def _begin_kwargs(self) -> dict[str, Any]:
        ident = self.job.identity
        return {
            "step": ident.step,
            "array_job_id": ident.array_job_id,
            "array_task_id": ident.array_task_id,
            "requeue_count": ident.restart_count,
        }

    def _meta(self, pid: int) -> ImageMeta:
        ident, user = self.job.identity, self.job.user
        try:
            version = self.engine.version()
        except HpcckptError:
            version = ""
        return ImageMeta(
            ckptid=0, job_id=ident.job_id, engine=self.engine.name, engine_version=version,
            step=ident.step, array_job_id=ident.array_job_id, array_task_id=ident.array_task_id,
            slurm={k: self.job.environ[k] for k in _SLURM_KEYS if k in self.job.environ},
            uid=user.uid, gid=user.gid, user=user.name, node=self.node, cmdline=list(self.job.cmdline),
            cwd=self.job.cwd, policy_digest=self.job.policy_digest, requeue_count=ident.restart_count,
            created=time.time(),
            extra={"stdio": dict(self.job.stdio),
                   "interval": dict(self.job.interval) if self.job.interval else None,
                   "cpuinfo": True, "root_host_pid": pid, "scratch": list(self.job.scratch),
                   # Its ids are then those of the job's own user namespace (0 = the owner).
                   "userns": needs_user_namespace()},
        )

    def _row_meta(self, frozen: float | None, frozen_at: float | None, staging: str) -> dict[str, Any]:
        """What the catalog row keeps for metrics and reports: the freeze and the interval in force."""
        doc: dict[str, Any] = {"interval": dict(self.job.interval) if self.job.interval else None}
        if frozen is not None:
            doc.update(frozen_s=round(frozen, 6), frozen_at=frozen_at, staging=staging)
        return doc

    def record_failure(self, err: HpcckptError | OSError) -> int | None:
        """A row marked failed, carrying the error and CRIU's log excerpt; None if the catalog is down too."""
        text = str(err)
        excerpt = getattr(err, "log_excerpt", "")
        if excerpt:
            text += "\n" + excerpt
        try:
            ckptid = self.catalog.begin(job_id=self.job.identity.job_id, uid=self.job.user.uid,
                                        user=self.job.user.name, node=self.node, engine=self.engine.name,
                                        meta=self._row_meta(None, None, ""), **self._begin_kwargs())
            self.catalog.fail(ckptid, text[-_ERROR_LIMIT:])
            return ckptid
        except HpcckptError as cat_err:
            hlog.event(_log, "checkpoint.unrecorded", f"could not record the failure in the catalog: {cat_err}",
                       30)
            return None
        finally:
            self._attempted(self.catalog)

    def _attempted(self, cat: Catalog) -> None:
        """A checkpoint attempt ended (committed or failed): the metrics hook, which must not fail a checkpoint."""
        if self.after_attempt is not None:
            try:
                self.after_attempt(cat)
            except Exception as err:  # metrics are best effort: never fail a checkpoint for them
                hlog.event(_log, "checkpoint.metrics_failed", f"could not refresh the metrics: {err}", 30)

    # -- taking a dump ---------------------------------------------------------

    def stage(self, pid: int, *, final: bool = False, deadline: float | None = None) -> Staged:
        """Dump the tree rooted at host pid ``pid`` into staging and mark it complete.

        The job is thawed before this returns unless ``final``; a final
        checkpoint's tree stays stopped (and is thawed again if this raises).
        """
        t0 = time.monotonic()
        if self.resident is not None:  # never dump a job whose pages are still coming (hpcckpt.core.lazyrestore)
            self.resident(deadline)
        user = self.job.user
        choice = choose_staging(user, self.job.identity.job_id, job_rss(pid), disk_root=self.disk_staging,
                                tmpfs=self.tmpfs)
        staged = StagedCheckpoint.create(choice.root, user)
        try:
            # The tree and its open files are read while the job still runs; only their sizes must be the
            # sizes at the freeze, and those come from CRIU's images below, after the job runs again.
            snap = procinfo.snapshot(pid)
            try:
                options, net = self.dump_options(pid)
                # A final checkpoint (the job stops anyway, often within a grace time) wants the least
                # total time, not the shortest freeze: no pre-dump.
                predumped = None if final else self._pre_dump(pid, staged.path, deadline, options)
                t_freeze = time.monotonic()
                # A final checkpoint's tree must not run on past its image: it stays stopped until the commit.
                dumped, predumped = self._dump(pid, staged, "stopped" if final else "running", deadline,
                                               predumped, options)
                # Right after the dump, while the job runs again: stopping it for the copy would take
                # SIGSTOP/SIGCONT, which MPI daemons treat as job control (an orted forwards them and a
                # singleton then hung in MPI_Finalize). Files the job rewrites in place meanwhile (shared
                # memory) are a few milliseconds newer than its memory, as on the node itself.
                if self.scratch_limit > 0 and scratch.has_content(self.job.scratch):
                    self._capture_scratch(staged.dump_dir)
            except HpcckptError as err:
                self.record_failure(err)
                hlog.event(_log, "checkpoint.dump_failed", f"checkpoint of job {self.job.identity.job_id} "
                           f"failed: {err}; the job goes on running", 40, excerpt=getattr(err, "log_excerpt", ""))
                raise
            frozen = time.monotonic() - t_freeze
            frozen_at = time.time() - frozen
            try:
                tasks: list[TaskInfo] = snap.tasks
                files = _files_at_dump(snap, staged.dump_dir)
                self.engine.cpuinfo_dump(staged.dump_dir)
                meta = self._meta(pid)
                meta.extra.update(options.recorded())
                # Closed in the restored job, which would otherwise wait on a peer that is not there.
                meta.extra["external_connections"] = [[c.peer.host, c.peer.port] for c in net.external]
                if predumped is not None:
                    adopt_parent(staged.dump_dir, predumped)
                    meta.extra["predump"] = True  # restored from an unpacked copy: CRIU streams no parents
                # In the catalog row: what the job paid for this image (metrics, hpcckpt drain --json).
                staged.mark_done(meta, user, tasks=tasks, files=files,
                                 begin={"meta": {**self._row_meta(frozen, frozen_at, choice.kind), "final": final}})
            except (HpcckptError, OSError) as err:
                if final:
                    signal_tree(procinfo.tree_pids(pid), signal.SIGCONT)
                if isinstance(err, OSError):
                    raise StoreError(f"{staged.path}: cannot finish the staged dump: {err}",
                                     hint="check free space in node-local staging (storage.staging, /dev/shm)"
                                     ) from err
                raise
        except BaseException:
            staged.remove()
            raise
        taken = Staged(staged, final, frozen, dumped.frozen_s, choice.kind, t0)
        with self._lock:
            self._taken[staged.name] = taken
        hlog.event(_log, "checkpoint.staged", f"job {self.job.identity.job_id} dumped to {choice.kind} staging",
                   10, stage=staged.name, frozen_s=round(frozen, 3), staging=choice.kind, why=choice.reason)
        return taken

    def _capture_scratch(self, dump_dir: Path) -> None:
        """Copy the job's temporary directories into the dump, for a restore on a node that lacks them."""
        try:
            copied, left_out = scratch.capture(self.job.scratch, dump_dir, self.scratch_limit)
        except OSError as err:
            raise StoreError(f"cannot copy the job's temporary directories into the checkpoint: {err}",
                             hint="check free space in node-local staging") from err
        if left_out:
            hlog.event(_log, "checkpoint.scratch_left_out", f"{len(left_out)} file(s) of the job's temporary "
                       f"directories are not in the checkpoint (not regular files, or past job.scratch_max): "
                       f"{', '.join(left_out[:5])}", 20 if copied else 30)

    def dump_options(self, pid: int) -> tuple[DumpOptions, netplan.NetPlan]:
        """The CRIU options for the job as it is now: what it holds decides, not a policy tuning.

        Raises :class:`ExternalConnectionError` when a connection leaves the job
        and policy ``job.external_connections`` is ``skip``.
        """
        net = netplan.plan_for(pid, procinfo.tree_pids(pid))
        if net.external:
            where = net.describe_external()
            if self.external_connections == "skip":
                raise ExternalConnectionError(
                    f"checkpoint skipped: job {self.job.identity.job_id} holds connections to peers outside "
                    f"it ({where}), and job.external_connections is 'skip'",
                    hint="close them before the next interval, or set job.external_connections: close "
                         "(the restored job then finds them closed)")
            hlog.event(_log, "checkpoint.external_connections",
                       f"job {self.job.identity.job_id} holds connections to peers outside it ({where}); "
                       "they are checkpointed but will be closed in a restored job "
                       "(job.external_connections: close)", 30)
        options = self.options
        if net.needs_tcp_established and not options.tcp_established:
            options = replace(options, tcp_established=True)
        return options, net

    def _pre_dump(self, pid: int, stage: Path, deadline: float | None, options: DumpOptions) -> Path | None:
        """Pre-dump into ``stage/predump`` while the job runs; None when off, or when it failed (then off)."""
        if not self.predump.enabled:
            return None
        assert isinstance(self.engine, PreDumpEngine)
        where = stage / PREDUMP_DIR
        try:
            fsutil.ensure_private_dir(where, self.job.user.uid, self.job.user.gid, base=stage)
            res = self.engine.pre_dump(pid, where, options=options, timeout=_remaining(deadline))
        except (HpcckptError, OSError) as err:
            shutil.rmtree(where, ignore_errors=True)
            self._predump_off(f"pre-dump failed: {err}")
            return None
        hlog.event(_log, "checkpoint.predumped", f"pre-dumped job {self.job.identity.job_id}", 10,
                   seconds=round(res.frozen_s, 3))
        return where

    def _dump(self, pid: int, staged: StagedCheckpoint, after: str, deadline: float | None,
              predumped: Path | None, options: DumpOptions) -> tuple[DumpResult, Path | None]:
        """The dump, tracked against the pre-dump if there is one; (result, the pre-dump it used)."""
        if predumped is not None:
            assert isinstance(self.engine, PreDumpEngine)
            try:
                return self.engine.dump(pid, staged.dump_dir, options=options, after=after,
                                        timeout=_remaining(deadline), track_from=predumped), predumped
            except DeadlineExceededError:
                raise
            except HpcckptError as err:
                self._predump_off(f"the dump after a pre-dump failed: {err}")
            shutil.rmtree(predumped, ignore_errors=True)
            shutil.rmtree(staged.dump_dir, ignore_errors=True)
            fsutil.ensure_private_dir(staged.dump_dir, self.job.user.uid, self.job.user.gid, base=staged.path)
        return self.engine.dump(pid, staged.dump_dir, options=options, after=after,
                                timeout=_remaining(deadline)), None

    def _predump_off(self, why: str) -> None:
        # Safe first: a checkpoint is never lost to a pre-dump problem, and one failure is enough.
        self.predump = PreDumpPlan(False, why)
        hlog.event(_log, "checkpoint.predump_off", f"{why}; checkpoints of this run dump without pre-dumps", 30)

    def take(self, pid: int) -> Staged | None:
        """A periodic checkpoint: None when skipped because the store is still busy (nothing frozen)."""
        adm = self.flusher.admit()
        if adm is Admission.SKIP:
            self.flusher.skipped += 1
            hlog.event(_log, "checkpoint.skipped", f"checkpoint of job {self.job.identity.job_id} skipped: the "
                       f"previous one is still being flushed (pipeline.on_busy={self.settings.on_busy})",
                       in_flight=self.in_flight())
            return None
        taken = self.stage(pid)
        if not self.flusher.submit(taken.staged):
            with self._lock:
                self._taken.pop(taken.staged.name, None)
            return None
        return taken

    def request(self, pid: int) -> Staged | None:
        """An explicit request (``hpcckpt checkpoint``): queued if the waiting slot is free, whatever on_busy says."""
        if len(self.flusher.in_flight()) >= 2:  # one flushing and one waiting: nowhere to put it
            return None
        taken = self.stage(pid)
        if not self.flusher.submit(taken.staged, force=True, timeout=0):
            with self._lock:
                self._taken.pop(taken.staged.name, None)
            return None
        return taken

    # -- synchronous and final checkpoints -----------------------------------------

    def checkpoint(
        self, pid: int, *, final: bool = False, deadline: float | None = None, thaw_on_failure: bool = True
    ) -> CheckpointResult:
        """Dump, flush and wait for the commit, all before ``deadline``.

        ``final``: the tree stays stopped until its image is committed and is
        then killed; if no image could be committed in time it is thawed
        (``thaw_on_failure``) or left stopped for the caller to end.
        """
        taken = self.stage(pid, final=final, deadline=deadline)
        name = taken.staged.name
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.flusher.submit(taken.staged, force=True, timeout=left):
                raise DeadlineExceededError("the flush in progress did not make room before the deadline; "
                                            "nothing was committed and the previous image stays the latest")
            res = self.wait(name, deadline)
            if res is None:
                self._abort(keep=final and not thaw_on_failure)
                raise DeadlineExceededError(
                    "the checkpoint deadline passed while the image was being written; nothing was committed "
                    "and the previous image stays the latest",
                    hint="raise --deadline (policy preemption.grace_time) or checkpoint to faster storage",
                )
            if not isinstance(res, CheckpointResult):
                raise StoreError(f"writing the checkpoint failed: {res.error}",
                                 hint="check free space and permissions of the store")
        except BaseException:
            with self._lock:
                self._taken.pop(name, None)
            if final and thaw_on_failure:
                signal_tree(procinfo.tree_pids(pid), signal.SIGCONT)
            raise
        if final:
            signal_tree(list(reversed(procinfo.tree_pids(pid))), signal.SIGKILL)
        with self._lock, contextlib.suppress(ValueError):
            self._fresh.remove(res)
        return res

    def _abort(self, *, keep: bool) -> None:
        """Stop the flusher at its next write; keep complete staged dumps for the epilog, or delete them.

        They are kept only when the job is ending and an epilog will publish
        them; a job that runs on would otherwise have an old state published
        after its newer images. A fresh flusher goes on from the same parent.
        """
        parent = self.flusher.parent
        left = self.flusher.abort(timeout=1.0)  # a worker stuck in I/O is a daemon thread: do not wait on it
        if not (keep and self.epilog_salvages):
            for s in left:
                s.remove()
        self.flusher = self._new_flusher(parent)

    def finish(self, timeout: float | None, *, job_ended: bool = True) -> bool:
        """At the runner's end: let the flush in flight complete, else abort it; False if aborted."""
        done = self.flusher.close(timeout)
        if not done:
            self._abort(keep=job_ended)
            self.flusher.close(0)
        return done

    def cleanup_staging(self) -> None:
        """Remove the job's staging directories once empty (never anything in them)."""
        user, job = self.job.user, self.job.identity.job_id
        for path in staging_candidates(user, job, self.disk_staging,
                                       tmpfs=self.tmpfs if self.tmpfs is not None else TMPFS):
            with contextlib.suppress(OSError):
                os.rmdir(path)
