"""Background flush: one worker packs staged dumps into the store while the job runs on.

Semantics the runner relies on:

* One flush at a time, plus at most one waiting (a queue of size 1): staged
  dumps never pile up on the node, whatever the checkpoint interval.
* :meth:`Flusher.admit` says, *before* the job is frozen, whether a
  checkpoint that falls due now would be flushed at once (``go``), wait for
  the flush in progress (``queue``, when ``pipeline.on_busy`` is ``queue``
  and nobody waits yet) or be skipped (``skip``), so a skipped checkpoint
  costs the job nothing.
* A flush publishes through :meth:`hpcckpt.store.images.Store.publish` (temp name,
  fsync, rename, catalog commit last): a reader never takes a half-flushed
  image. Its catalog row carries ``meta["stage"]``, the staged directory's
  unique name, so the epilog's :func:`salvage_staging` never publishes a
  staged dump twice.
* Each image is packed against the previous one's in-memory index when the
  chain rules allow (:mod:`hpcckpt.core.pipeline.chain`), so an incremental
  checkpoint reads nothing back from the store.
* :meth:`Flusher.abort` stops the flush in progress at its next write (the
  publish removes its temp file and marks the row failed) and leaves staged
  dumps with their completion marker for the epilog to salvage.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog, Status
from hpcckpt.context import User, node_name
from hpcckpt.core.pipeline.chain import decide_chain
from hpcckpt.core.pipeline.staging import STAGE_PREFIX, StagedCheckpoint
from hpcckpt.errors import HpcckptError, StoreError
from hpcckpt.fs import safe as fsutil
from hpcckpt.fs.tree import remove_tree_at
from hpcckpt.image import format as F
from hpcckpt.image.model import PackStats
from hpcckpt.image.pack import pack_dir
from hpcckpt.image.parent import index_image
from hpcckpt.image.refs import ParentIndex
from hpcckpt.policy import Policy
from hpcckpt.store.images import Store

_log = hlog.get("pipeline")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FlushAbortedError(StoreError):
    """The flush was stopped by :meth:`Flusher.abort` (the job is ending)."""


class Admission(str, enum.Enum):
    GO = "go"  # nothing in flight: flushed at once
    QUEUE = "queue"  # waits for the flush in progress
    SKIP = "skip"  # not taken: on_busy is skip, or one already waits


@dataclass(frozen=True)
class FlushSettings:
    """The ``pipeline`` and ``storage.compression`` policy keys the flusher uses."""

    on_busy: str = "skip"
    incremental: bool = True
    full_every: int = 8
    max_chain_ratio: float = 2.0
    codec: str = "none"
    level: int = 3
    chunk_size: int = F.DEFAULT_CHUNK
    workers: int = 1
    # Policy retention.fallback_full (see hpcckpt.core.pipeline.chain); the policy's default is true.
    fallback_full: bool = False

    def __post_init__(self) -> None:
        if self.on_busy not in ("skip", "queue"):
            raise ValueError(f"on_busy must be 'skip' or 'queue', not {self.on_busy!r}")

    @classmethod
    def from_policy(cls, pol: Policy, *, workers: int = 1) -> FlushSettings:
        p = pol.pipeline
        # The policy allows chunks up to 1 GiB; the image format caps a chunk at 16 MiB.
        chunk = min(max(int(p.chunk_size), F.MIN_CHUNK), F.MAX_CHUNK)
        comp = pol.storage.compression
        return cls(on_busy=str(p.on_busy), incremental=bool(p.incremental), full_every=int(p.full_every),
                   max_chain_ratio=float(p.max_chain_ratio), codec=str(comp.codec), level=int(comp.level),
                   chunk_size=chunk, workers=workers,
                   fallback_full=bool(getattr(pol.retention, "fallback_full", True)))


@dataclass
class FlushResult:
    stage: str
    ok: bool
    ckptid: int | None = None
    path: Path | None = None
    error: str = ""
    parent: int | None = None
    chain: str = ""  # why full or incremental
    bytes_in: int = 0
    bytes_out: int = 0
    ref_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path) if self.path else None
        return d


Write = Callable[[BinaryIO, int], PackStats]


class Publisher(Protocol):
    """Where flushed images go: the store and catalog (a fake in unit tests)."""

    def publish(self, staged: StagedCheckpoint, parent: int | None, write: Write) -> tuple[int, Path]: ...

    def committed_stages(self, job_id: str) -> set[str]: ...

    def latest_image(self, job_id: str) -> Path | None: ...

    def may_chain_on(self, job_id: str, parent: ParentIndex) -> bool: ...


class StorePublisher:
    """The real publisher. The catalog is opened per thread: SQLite connections are not shared."""

    def __init__(self, store: Store, open_catalog: Callable[[], Catalog]) -> None:
        self.store = store
        self._open_catalog = open_catalog
        self._local = threading.local()

    def _cat(self) -> Catalog:
        cat: Catalog | None = getattr(self._local, "cat", None)
        if cat is None:
            cat = self._local.cat = self._open_catalog()
        return cat

    def catalog(self) -> Catalog:
        """This thread's own catalog connection (retention runs on the flusher's thread with it)."""
        return self._cat()

    def publish(self, staged: StagedCheckpoint, parent: int | None, write: Write) -> tuple[int, Path]:
        meta = staged.meta
        assert meta is not None, "only complete staged checkpoints are published"
        begin = {
            "step": meta.step, "array_job_id": meta.array_job_id, "array_task_id": meta.array_task_id,
            "requeue_count": meta.requeue_count, **staged.begin,
        }
        begin["meta"] = {**dict(begin.get("meta") or {}), "stage": staged.name}
        with self.store.publish(self._cat(), job_id=meta.job_id, engine=meta.engine,
                                node=meta.node or node_name(), parent=parent, **begin) as pub:
            stats = write(pub.file, pub.ckptid)
            pub.meta.update(bytes_in=stats.bytes_in, bytes_out=stats.bytes_out, ref_bytes=stats.ref_bytes)
        return int(pub.ckptid), Path(pub.path)

    def committed_stages(self, job_id: str) -> set[str]:
        out: set[str] = set()
        for rec in self._cat().list(job_id, uid=self.store.user.uid):
            stage = (rec.meta or {}).get("stage")
            if rec.status is Status.COMMITTED and isinstance(stage, str):
                out.add(stage)
        return out

    def latest_image(self, job_id: str) -> Path | None:
        rec = self._cat().latest(job_id, uid=self.store.user.uid)
        return Path(rec.path) if rec is not None and rec.path else None

    def may_chain_on(self, job_id: str, parent: ParentIndex) -> bool:
        """Whether a new image may be incremental on ``parent`` (policy retention.fallback_full).

        Every image it would take chunks from must still be committed (not found corrupt since), and
        the job must have a committed full image outside that chain to fall back on.
        """
        cat = self._cat()
        chain = {c for c in (parent.ckptid, parent.base, *parent.ckptids) if c}
        for c in chain:
            rec = cat.get(c)
            if rec is None or rec.status is not Status.COMMITTED:
                return False
        fulls = {r.ckptid for r in cat.committed(job_id, uid=self.store.user.uid) if r.parent is None}
        return bool(fulls - chain)

    def close(self) -> None:
        cat = getattr(self._local, "cat", None)
        if cat is not None:
            cat.close()
            self._local.cat = None


class _AbortableWriter:
    """The publish file, refusing further writes once the flush is aborted."""

    def __init__(self, f: BinaryIO, stop: threading.Event) -> None:
        self._f = f
        self._stop = stop

    def write(self, data: Any) -> int:
        if self._stop.is_set():
            raise FlushAbortedError("flush aborted: the job is ending; the epilog salvages the staged dump")
        return self._f.write(data)


def flush_one(
    staged: StagedCheckpoint,
    publisher: Publisher,
    settings: FlushSettings,
    parent: ParentIndex | None,
    stop: threading.Event | None = None,
) -> tuple[FlushResult, ParentIndex | None]:
    """Pack and publish one complete staged dump; the result and the new image's index."""
    assert staged.meta is not None
    fallback = True
    if settings.fallback_full and settings.incremental and parent is not None:
        # Incremental only on a chain still intact, with a full image outside it to fall back on.
        fallback = publisher.may_chain_on(staged.meta.job_id, parent)
    decision = decide_chain(parent, incremental=settings.incremental, full_every=settings.full_every,
                            max_chain_ratio=settings.max_chain_ratio, fallback=fallback)
    stop = stop or threading.Event()
    holder: dict[str, PackStats] = {}
    meta = dataclasses.replace(staged.meta, parent_ckptid=None)

    def write(f: BinaryIO, ckptid: int) -> PackStats:
        stats = pack_dir(
            staged.pack_source(), cast(BinaryIO, _AbortableWriter(f, stop)), dataclasses.replace(meta, ckptid=ckptid),
            tasks=staged.tasks, files=staged.files, codec=settings.codec, level=settings.level,
            chunk_size=settings.chunk_size, parent=decision.parent, workers=settings.workers,
        )
        holder["stats"] = stats
        return stats

    t0 = time.monotonic()
    pid = decision.parent.ckptid if decision.parent else None
    ckptid, path = publisher.publish(staged, pid, write)
    stats = holder["stats"]
    res = FlushResult(stage=staged.name, ok=True, ckptid=ckptid, path=path, parent=pid, chain=decision.reason,
                      bytes_in=stats.bytes_in, bytes_out=stats.bytes_out, ref_bytes=stats.ref_bytes,
                      seconds=time.monotonic() - t0)
    return res, stats.index


class Flusher:
    """One background worker and a queue of one. Thread-safe; the runner's loop calls it."""

    def __init__(
        self,
        publisher: Publisher,
        settings: FlushSettings,
        *,
        parent: ParentIndex | None = None,
        on_done: Callable[[FlushResult], None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.settings = settings
        self._parent = parent  # after a restart: index_image(the image restored from)
        self._on_done = on_done
        self._cond = threading.Condition()
        self._current: StagedCheckpoint | None = None
        self._queued: StagedCheckpoint | None = None
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.results: list[FlushResult] = []
        self.skipped = 0

    # -- state ---------------------------------------------------------------

    @property
    def parent(self) -> ParentIndex | None:
        with self._cond:
            return self._parent

    @parent.setter
    def parent(self, index: ParentIndex | None) -> None:
        """A job restored again from another image (a lazy restore that failed): chain on that one."""
        with self._cond:
            self._parent = index

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._current is not None or self._queued is not None

    def in_flight(self) -> list[StagedCheckpoint]:
        with self._cond:
            return [s for s in (self._current, self._queued) if s is not None]

    def admit(self) -> Admission:
        with self._cond:
            return self._admit()

    def _admit(self) -> Admission:
        if self._current is None and self._queued is None:
            return Admission.GO
        if self.settings.on_busy == "queue" and self._queued is None:
            return Admission.QUEUE
        return Admission.SKIP

    # -- submitting ----------------------------------------------------------

    def submit(self, staged: StagedCheckpoint, *, force: bool = False, timeout: float | None = None) -> bool:
        """Hand over a complete staged dump. False: skipped (and its staging removed).

        ``force`` (a final checkpoint before the job stops) waits up to
        ``timeout`` for the queue slot instead of skipping.
        """
        if staged.meta is None:
            raise ValueError("submit a staged checkpoint after mark_done()")
        with self._cond:
            if self._closed:
                raise StoreError("the flusher is closed")
            if force:
                ok = self._cond.wait_for(lambda: self._queued is None, timeout)
                adm = Admission.QUEUE if ok else Admission.SKIP
            else:
                adm = self._admit()
            if adm is not Admission.SKIP:
                self._queued = staged
                self._ensure_thread()
                self._cond.notify_all()
                hlog.event(_log, "pipeline.queued", f"staged checkpoint {staged.name} {adm.value}",
                           logging.DEBUG, stage=staged.name, admission=adm.value)
                return True
            self.skipped += 1
        staged.remove()
        hlog.event(_log, "pipeline.skipped", f"checkpoint skipped: a flush is in progress "
                   f"(pipeline.on_busy={self.settings.on_busy})", stage=staged.name)
        return False

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name="hpcckpt-flush", daemon=True)
            self._thread.start()

    # -- the worker ------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued is not None or self._closed)
                if self._queued is None:
                    return
                staged, self._queued = self._queued, None
                self._current = staged
                parent = self._parent
                self._cond.notify_all()
            result = self._run(staged, parent)
            with self._cond:
                self._current = None
                self.results.append(result)
                self._cond.notify_all()
            if self._on_done is not None:
                try:
                    self._on_done(result)
                except Exception as exc:  # a callback bug must not kill the flusher
                    _log.exception("flush callback failed: %s", exc)

    def _run(self, staged: StagedCheckpoint, parent: ParentIndex | None) -> FlushResult:
        t0 = time.monotonic()
        try:
            result, index = flush_one(staged, self.publisher, self.settings, parent, self._stop)
        except FlushAbortedError as exc:
            # Leave the staged dump and its marker: the epilog salvages it.
            return FlushResult(stage=staged.name, ok=False, error=str(exc), seconds=time.monotonic() - t0)
        except (HpcckptError, OSError) as exc:
            msg = exc.render() if isinstance(exc, HpcckptError) else str(exc)
            hlog.event(_log, "pipeline.flush_failed", f"flush of {staged.name} failed: {msg}", logging.ERROR,
                       stage=staged.name)
            staged.remove()
            return FlushResult(stage=staged.name, ok=False, error=msg, seconds=time.monotonic() - t0)
        with self._cond:
            self._parent = index
        staged.remove()
        hlog.event(_log, "pipeline.flushed", f"checkpoint {result.ckptid} flushed ({result.chain})",
                   **{k: v for k, v in result.to_dict().items() if k not in ("ok", "error")})
        return result

    # -- ending ------------------------------------------------------------------

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._current is None and self._queued is None, timeout)

    def abort(self, timeout: float | None = 30.0) -> list[StagedCheckpoint]:
        """Stop now: the flush in progress fails at its next write, the waiting one is not started.

        Returns the staged dumps left for the epilog (they keep their marker).
        """
        with self._cond:
            left = [s for s in (self._current, self._queued) if s is not None]
            self._queued = None
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
        self._join(timeout)
        hlog.event(_log, "pipeline.aborted", f"flush aborted; {len(left)} staged dump(s) left for the epilog",
                   stages=[s.name for s in left])
        return left

    def close(self, timeout: float | None = None) -> bool:
        """Finish what is in flight, then stop the worker; False if ``timeout`` passed first."""
        done = self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if done:
            self._join(timeout)
        return done

    def _join(self, timeout: float | None) -> None:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)


# --- the epilog's side ----------------------------------------------------------


@dataclass
class SalvageReport:
    published: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def salvage_staging(
    stage_root: Path,
    publisher: Publisher,
    user: User,
    settings: FlushSettings | None = None,
) -> SalvageReport:
    """At job end: publish every complete staged dump the job did not flush; delete everything else.

    Complete means it has its ``.done`` marker and readable metadata, and no
    committed checkpoint came from it yet (``meta["stage"]`` in the catalog).
    Dumps are published oldest first, each incremental on the job's latest
    committed image where the chain rules allow. Runs as root over the
    user's directory: entries are opened through descriptors, never
    following symlinks, and packed through ``/proc/self/fd`` of the opened
    directory so no path can be swapped underneath.
    """
    settings = settings or FlushSettings()
    report = SalvageReport()
    base = Path(stage_root).parent
    try:
        sfd = fsutil.open_private_dir(Path(stage_root), user.uid, user.gid, base=base, create=False)
    except FileNotFoundError:
        return report
    try:
        names = sorted(n for n, st in fsutil.iter_dir_nofollow(sfd))
        done_stages: set[str] | None = None
        for name in names:
            staged = StagedCheckpoint.load(sfd, name, Path(stage_root)) if name.startswith(STAGE_PREFIX) else None
            if staged is not None and staged.meta is not None:
                if done_stages is None:
                    done_stages = publisher.committed_stages(staged.meta.job_id)
                if name not in done_stages:
                    try:
                        _salvage_one(sfd, name, staged, publisher, settings, report)
                    except (HpcckptError, OSError) as exc:
                        msg = exc.render() if isinstance(exc, HpcckptError) else str(exc)
                        report.errors.append(f"{stage_root / name}: {msg}")
                        hlog.event(_log, "pipeline.salvage_failed", f"cannot publish {name}: {msg}",
                                   logging.ERROR, stage=name)
            remove_tree_at(sfd, name)
            report.removed.append(name)
    finally:
        os.close(sfd)
    return report


def _salvage_one(sfd: int, name: str, staged: StagedCheckpoint, publisher: Publisher, settings: FlushSettings,
                 report: SalvageReport) -> None:
    assert staged.meta is not None
    parent = None
    latest = publisher.latest_image(staged.meta.job_id)
    if latest is not None and settings.incremental:
        try:
            parent = index_image(latest)
        except HpcckptError as exc:  # a full image is always possible
            _log.warning("salvage: %s cannot be a parent (%s); writing a full image", latest, exc)
    fd = os.open(name, _DIR_FLAGS, dir_fd=sfd)
    try:
        dfd = os.open("dump", _DIR_FLAGS, dir_fd=fd)
        try:
            res, _ = flush_one(_PinnedStage(staged, dfd), publisher, settings, parent)
        finally:
            os.close(dfd)
    finally:
        os.close(fd)
    assert res.ckptid is not None
    report.published.append(res.ckptid)
    hlog.event(_log, "pipeline.salvaged", f"published staged checkpoint {res.ckptid} at job end",
               stage=name, ckptid=res.ckptid, parent=res.parent)


class _PinnedStage(StagedCheckpoint):
    """A staged checkpoint whose dump directory is an already opened descriptor."""

    def __init__(self, staged: StagedCheckpoint, dump_fd: int) -> None:
        super().__init__(staged.path, staged.meta, staged.tasks, staged.files, staged.begin)
        self._dump_fd = dump_fd

    def pack_source(self) -> str:
        # "/." makes O_NOFOLLOW apply to "." while the magic link pins the opened directory
        return f"/proc/self/fd/{self._dump_fd}/."
