"""``Checkpointer``: the API an application uses to checkpoint itself.

::

    from hpcckpt import Checkpointer
    ck = Checkpointer(comm=MPI.COMM_WORLD)   # comm is optional
    state = ck.restore()                     # None on a fresh start
    while work_left:
        step(state)
        if ck.due():                         # interval elapsed or a preemption signal arrived
            ck.save(state)                   # collective when comm is given; returns the ckptid
        if ck.stop_requested:                # after the save that a preemption signal asked for
            break

With a communicator every call is collective: each rank writes its own shard
in parallel (hpcckpt.app.twophase), and ``due()`` is agreed by all ranks, so
a signal that reached one rank is acted on by all at the same step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.app import shards, twophase
from hpcckpt.app.coord import Coordinator, MPICoordinator, coordinator_for
from hpcckpt.app.jobenv import JobContext, job_context
from hpcckpt.app.requests import CHECKPOINT, STOP, RequestReader
from hpcckpt.app.signals import PreemptFlag
from hpcckpt.catalog import open_catalog
from hpcckpt.context import User, current_user
from hpcckpt.errors import MPIError, UsageError
from hpcckpt.image import ImageMeta
from hpcckpt.policy import load_policy
from hpcckpt.policy.daly import choose_interval
from hpcckpt.store.images import Store

_log = hlog.get("app")

# Bits of the flag word that due() ORs over the ranks.
_DUE_INTERVAL = 1
_DUE_SIGNAL = 2
_DUE_REQUEST = 4


@dataclass
class Resized:
    """What ``restore(allow_resize=True)`` returns when the rank count changed.

    ``load(r)`` reads old rank ``r``'s state (verified against the manifest);
    the application decides which old shards each new rank needs.
    """

    ckptid: int
    old_size: int
    new_size: int
    _load: Callable[[int], Any]

    def load(self, old_rank: int) -> Any:
        if not 0 <= old_rank < self.old_size:
            raise UsageError(f"old rank {old_rank} out of range 0..{self.old_size - 1}")
        return self._load(old_rank)

    def all(self) -> list[Any]:
        return [self._load(r) for r in range(self.old_size)]


class Checkpointer:
    """Application-assisted checkpoints of one program (one or many MPI ranks).

    Arguments (all optional; see hpcckpt.app.jobenv for the environment):

    ``comm``        an mpi4py communicator (or a Coordinator); None for one process
    ``job_id``      the checkpoints' job id
    ``store``       the store root; ``catalog`` a catalog URL
    ``interval``    seconds (or "10m", "auto") between checkpoints for ``due()``
    ``policy``      a loaded Policy (default: ``load_policy()``, i.e. site + $HPCCKPT_POLICY)
    ``signals``     preemption signal names (default: the policy's, TERM and USR1)
    ``install_signals``  False leaves signal handling to the program (call ``request()``)
    ``user``        whose store (default: the calling user)
    """

    def __init__(
        self,
        comm: Any | None = None,
        *,
        job_id: str | None = None,
        store: str | Path | None = None,
        catalog: str | None = None,
        interval: int | str | None = None,
        policy: Any | None = None,
        signals: Sequence[str] | None = None,
        install_signals: bool = True,
        user: User | None = None,
    ) -> None:
        self._coord: Coordinator = coordinator_for(comm)
        if policy is None:
            policy = load_policy()
        self.policy = policy
        ctx = job_context(policy, job_id=job_id, store=store, catalog=catalog, interval=interval)
        # The ranks may see different environments (a launcher that forwards
        # only some variables); rank 0's view is the one that counts.
        self.ctx: JobContext = self._coord.bcast(ctx)
        self.user = user or current_user()
        self._store: Any = None
        self._catalog: Any = None
        self._flag = PreemptFlag()
        if install_signals:
            names = list(signals) if signals is not None else list(policy.preemption.signals)
            self._flag.install(names)
        self._requested = False
        # Under 'hpcckpt run --engine app' the runner's requests (hpcckpt.app.requests); rank 0 reads them.
        self._runner_requests = RequestReader.from_env() if self._coord.rank == 0 else None
        self._last = time.monotonic()
        self._costs: list[float] = []
        self._interval_inputs: dict[str, Any] = {}
        self._parent: int | None = None
        self._preempted = False
        self._closed = False

    # -- properties ---------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._coord.rank

    @property
    def size(self) -> int:
        return self._coord.size

    @property
    def job_id(self) -> str:
        return self.ctx.job_id

    @property
    def stop_requested(self) -> bool:
        """True (on every rank) once ``due()`` reported a preemption signal.

        Save, then exit: Slurm is about to end the job, and will requeue it
        if the policy asks (preemption.action).
        """
        return self._preempted

    @property
    def interval(self) -> float:
        """Seconds between checkpoints that ``due()`` currently uses."""
        if self.ctx.interval != "auto":
            return float(self.ctx.interval)

        seconds, self._interval_inputs = choose_interval(self.policy, self._costs)
        return float(seconds)

    # -- scheduling ---------------------------------------------------------

    def request(self) -> None:
        """Ask for a checkpoint at the next ``due()`` (from a program's own signal handler)."""
        self._requested = True

    def due(self) -> bool:
        """Collective: True on every rank when a checkpoint should be taken now.

        Rank 0's clock decides the interval (clocks differ across nodes); any
        rank's preemption signal or ``request()`` counts for all.
        """
        bits = 0
        if self._flag.is_set:
            bits |= _DUE_SIGNAL
        if self._requested:
            bits |= _DUE_REQUEST
        if self._runner_requests is not None:
            words = self._runner_requests.poll()
            if STOP in words:
                bits |= _DUE_SIGNAL
            if CHECKPOINT in words:
                self._requested = True
                bits |= _DUE_REQUEST
        if self.rank == 0 and time.monotonic() - self._last >= self.interval:
            bits |= _DUE_INTERVAL
        agreed = self._coord.allreduce_bits(bits)
        if agreed & _DUE_SIGNAL:
            self._preempted = True
        return bool(agreed)

    # -- save and restore ---------------------------------------------------

    def _rank0_store(self) -> twophase.Rank0:
        if self._store is None:
            self._store = Store(self.ctx.store_root, self.user)
            self._catalog = open_catalog(self.ctx.catalog_url, self.ctx.store_root, self.user)
        begin = {
            "job_id": self.ctx.job_id,
            "engine": "app",
            "node": self.ctx.node,
            "step": self.ctx.step,
            "array_job_id": self.ctx.array_job_id,
            "array_task_id": self.ctx.array_task_id,
            # Each image is whole (no chunk of another): no parent, so that retention may delete the one before.
            "requeue_count": self.ctx.requeue_count,
            "meta": {"app": {"ranks": self.size, "shard_pattern": shards.SHARD_PATTERN, "previous": self._parent}},
        }
        return twophase.Rank0(self._store, self._catalog, begin)

    def _meta(self) -> ImageMeta:
        ctx = self.ctx
        return ImageMeta(
            ckptid=0,
            job_id=ctx.job_id,
            engine="app",
            step=ctx.step,
            array_job_id=ctx.array_job_id,
            array_task_id=ctx.array_task_id,
            slurm=dict(ctx.slurm),
            uid=self.user.uid,
            gid=self.user.gid,
            user=self.user.name,
            node=ctx.node,
            cmdline=list(ctx.cmdline),
            cwd=ctx.cwd,
            policy_digest=self.policy.digest(),
            requeue_count=ctx.requeue_count,
        )

    def _options(self) -> twophase.SaveOptions:
        storage = self.policy.storage
        return twophase.SaveOptions(
            staging=storage.staging,
            codec=storage.compression.codec,
            level=storage.compression.level,
            chunk_size=self.policy.pipeline.chunk_size,
        )

    def save(self, state: Any, *, files: Sequence[str | os.PathLike[str]] = ()) -> int:
        """Collective: checkpoint this rank's ``state`` (and ``files``); return the committed ckptid.

        ``state`` may hold None, bool, int, float, str, bytes, lists, tuples,
        dicts and numpy arrays (see hpcckpt.app.state). ``files`` are copied
        into this rank's shard and put back by ``restore()``. Raises MPIError
        on every rank if any rank failed; the previous checkpoint then stays
        the latest.
        """
        self._check_open()
        t0 = time.monotonic()
        rank0 = self._rank0_store() if self.rank == 0 else None
        try:
            ckptid = twophase.save(self._coord, rank0, self._meta(), state, files, self._options())
        finally:
            # Failed or not, wait a full interval: retrying at once would
            # likely fail the same way and stall the computation.
            self._last = time.monotonic()
            self._requested = False
        self._flag.clear()
        self._parent = ckptid
        self._costs.append(time.monotonic() - t0)
        del self._costs[:-16]
        return ckptid

    def restore(
        self,
        *,
        allow_resize: bool = False,
        reshard: Callable[[Resized], Any] | None = None,
    ) -> Any:
        """Collective: the latest good checkpoint's state for this rank, or None on a fresh start.

        Captured files are put back first. When the checkpoint was taken with
        another number of ranks it is refused (MPIError) unless the
        application handles it: ``reshard(resized)`` returns this rank's
        state, or ``allow_resize=True`` returns a :class:`Resized` to load old
        shards from.
        """
        self._check_open()
        candidates: Callable[[], list[Any]] | None = None
        if self.rank == 0:
            r0 = self._rank0_store()
            candidates = lambda: r0.catalog.committed(self.ctx.job_id, uid=self.user.uid)  # noqa: E731

        def on_resize(manifest: shards.Manifest, mpath: Path) -> Any:
            resized = Resized(manifest.ckptid, manifest.ranks, self.size,
                              lambda r: self._load_any(manifest, mpath, r))
            return reshard(resized) if reshard is not None else resized

        result = twophase.restore(
            self._coord, candidates, staging=self.policy.storage.staging,
            allow_resize=allow_resize or reshard is not None, on_resize=on_resize,
        )
        if result is None:
            if self.rank == 0:
                hlog.event(_log, "app.fresh_start", f"no checkpoint of job {self.job_id}: fresh start",
                           logging.DEBUG, job_id=self.job_id)
            return None
        self._parent = result.ckptid
        if self.rank == 0:
            self._catalog.record_resume(result.ckptid, resumed_by="app", new_job_id=self.ctx.job_id)
            hlog.event(_log, "app.restored", f"restored checkpoint {result.ckptid}", ckptid=result.ckptid,
                       ranks=self.size, job_id=self.job_id)
        return result.state

    def _load_any(self, manifest: shards.Manifest, mpath: Path, old_rank: int) -> Any:
        ref = manifest.shards[old_rank]
        with shards.staging_dir(self.policy.storage.staging) as stage:
            value, _files = shards.load_shard(shards.shard_path(mpath, ref), ref, manifest.ranks, stage / "s")
        return value

    @property
    def last_ckptid(self) -> int | None:
        """The checkpoint this run last saved or restored."""
        return self._parent

    # -- lifetime -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise MPIError("this Checkpointer is closed")

    def close(self) -> None:
        """Put the program's signal handlers back and release the catalog and communicator."""
        if self._closed:
            return
        self._closed = True
        self._flag.uninstall()
        if self._catalog is not None:
            self._catalog.close()
        if isinstance(self._coord, MPICoordinator):
            self._coord.free()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
