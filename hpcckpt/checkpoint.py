"""One checkpoint of a running job: dump, pack, publish, commit; and record failures.

The order is what keeps the job's latest image valid at every instant:

1. ``criu dump --leave-stopped`` into a fresh private staging directory. The
   job is frozen only from here ...
2. ... while its task tree and open files are read from /proc (the sizes CRIU
   saw, see :mod:`hpcckpt.procinfo`), until SIGCONT. For a *final*
   checkpoint (preemption, ``--and-stop``) the tree stays stopped until the
   image is committed and is then killed; if publishing fails it is thawed,
   so a failed ``--and-stop`` never loses the job.
3. ``criu cpuinfo dump``, so a restore can refuse a CPU that lacks features.
4. Pack the staging directory into an hpcckpt image, written straight into
   the store's temp file (``Store.publish``: catalog row ``writing``, fsync,
   rename, fsync dir, commit). Nothing is committed unless every byte is
   durable; a crash leaves a temp file that gc removes.
5. Retention, after success only.

A failed dump gets a catalog row of its own, marked ``failed`` with CRIU's
log excerpt, so ``hpcckpt list`` shows what went wrong; the job runs on and
the previous image stays the latest.

A deadline (a ``time.monotonic()`` value) bounds everything: the dump's
timeout is what is left of it, and the writer that packs into the store
raises :class:`DeadlineExceededError` as soon as it is passed, which makes
the store remove the temp file and mark the row failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from hpcckpt import log as hlog
from hpcckpt import procinfo
from hpcckpt.catalog import Catalog
from hpcckpt.context import User
from hpcckpt.engine.base import CheckpointEngine, DumpOptions
from hpcckpt.errors import DeadlineExceededError, HpcckptError, StoreError
from hpcckpt.fsutil import ensure_private_dir
from hpcckpt.image import ImageMeta, OpenFile, TaskInfo, pack_dir
from hpcckpt.jobid import JobIdentity
from hpcckpt.store import Store

_log = hlog.get("checkpoint")

# Slurm variables worth keeping in the image: enough to resubmit or explain it later.
_SLURM_KEYS = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_JOB_QOS",
    "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT",
    "SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_CPUS_ON_NODE", "SLURM_SUBMIT_DIR",
)
_ERROR_LIMIT = 4000  # characters of error text kept in the catalog row


@dataclass
class PackSettings:
    codec: str = "none"
    level: int = 3
    chunk_size: int = 4 << 20

    @classmethod
    def from_policy(cls, pol: Any) -> PackSettings:
        comp = pol.storage.compression
        return cls(codec=str(comp.codec), level=int(comp.level), chunk_size=int(pol.pipeline.chunk_size))


@dataclass
class JobInfo:
    """What the pipeline records about the job in every image."""

    identity: JobIdentity
    user: User
    cmdline: list[str]
    cwd: str
    stdio: dict[str, str]  # job fd -> CRIU resource name of the runner's pipe ("pipe:[N]")
    interval: float | None
    policy_digest: str = ""
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class CheckpointResult:
    ckptid: int
    path: Path
    size_bytes: int
    frozen_s: float  # job stopped: dump plus reading /proc
    dump_s: float
    pack_s: float  # pack + publish (the job runs meanwhile, except for final checkpoints)
    total_s: float
    final: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "ckptid": self.ckptid, "path": str(self.path), "size_bytes": self.size_bytes,
            "frozen_s": round(self.frozen_s, 3), "dump_s": round(self.dump_s, 3),
            "pack_s": round(self.pack_s, 3), "total_s": round(self.total_s, 3), "final": self.final,
        }


class DeadlineWriter:
    """A write-only file that refuses to write past ``deadline`` (monotonic seconds)."""

    def __init__(self, inner: BinaryIO, deadline: float | None) -> None:
        self._inner = inner
        self._deadline = deadline

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise DeadlineExceededError("the checkpoint deadline passed while the image was being written; "
                                        "nothing was committed and the previous image stays the latest")
        return self._inner.write(data)

    def flush(self) -> None:
        self._inner.flush()


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


class Checkpointer:
    """Takes checkpoints of one job into one store and catalog."""

    def __init__(
        self,
        *,
        engine: CheckpointEngine,
        store: Store,
        catalog: Catalog,
        job: JobInfo,
        staging_root: Path,
        options: DumpOptions,
        pack: PackSettings,
        retention: Callable[[], None] | None = None,
        node: str | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.catalog = catalog
        self.job = job
        self.staging_root = staging_root
        self.options = options
        self.pack = pack
        self.retention = retention
        self.node = node or socket.gethostname()
        self._seq = 0

    # -- helpers -------------------------------------------------------------

    def _fresh_staging(self) -> Path:
        self._seq += 1
        d = self.staging_root / f"dump-{os.getpid()}-{self._seq}"
        if d.exists():
            shutil.rmtree(d)
        base = self.staging_root.parent
        ensure_private_dir(d, self.job.user.uid, self.job.user.gid, base=base)
        return d

    def _begin_kwargs(self) -> dict[str, Any]:
        ident = self.job.identity
        return {
            "step": ident.step,
            "array_job_id": ident.array_job_id,
            "array_task_id": ident.array_task_id,
            "requeue_count": ident.restart_count,
        }

    def _meta(self, ckptid: int, pid: int) -> ImageMeta:
        ident, user = self.job.identity, self.job.user
        try:
            version = self.engine.version()
        except HpcckptError:
            version = ""
        return ImageMeta(
            ckptid=ckptid, job_id=ident.job_id, engine=self.engine.name, engine_version=version,
            step=ident.step, array_job_id=ident.array_job_id, array_task_id=ident.array_task_id,
            slurm={k: self.job.environ[k] for k in _SLURM_KEYS if k in self.job.environ},
            uid=user.uid, gid=user.gid, user=user.name, node=self.node, cmdline=list(self.job.cmdline),
            cwd=self.job.cwd, policy_digest=self.job.policy_digest, requeue_count=ident.restart_count,
            extra={"stdio": dict(self.job.stdio), "interval": self.job.interval, "cpuinfo": True,
                   "root_host_pid": pid},
        )

    def record_failure(self, err: HpcckptError | OSError) -> int | None:
        """A row marked failed, carrying the error and CRIU's log excerpt; None if the catalog is down too."""
        text = str(err)
        excerpt = getattr(err, "log_excerpt", "")
        if excerpt:
            text += "\n" + excerpt
        try:
            ckptid = self.catalog.begin(job_id=self.job.identity.job_id, uid=self.job.user.uid,
                                        user=self.job.user.name, node=self.node, engine=self.engine.name,
                                        **self._begin_kwargs())
            self.catalog.fail(ckptid, text[-_ERROR_LIMIT:])
            return ckptid
        except HpcckptError as cat_err:
            hlog.event(_log, "checkpoint.unrecorded", f"could not record the failure in the catalog: {cat_err}",
                       30)
            return None

    # -- the pipeline ----------------------------------------------------------

    def checkpoint(self, pid: int, *, final: bool = False, deadline: float | None = None) -> CheckpointResult:
        """Checkpoint the tree rooted at host pid ``pid``; see the module docstring.

        For ``final``, the job is dead when this returns normally, and thawed
        (still running) when it raises.
        """
        t0 = time.monotonic()
        staging = self._fresh_staging()
        try:
            return self._checkpoint(pid, staging, final, deadline, t0)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _checkpoint(self, pid: int, staging: Path, final: bool, deadline: float | None, t0: float) -> CheckpointResult:
        try:
            dumped = self.engine.dump(pid, staging, options=self.options, after="stopped",
                                      timeout=_remaining(deadline))
        except HpcckptError as err:
            self.record_failure(err)
            hlog.event(_log, "checkpoint.dump_failed", f"checkpoint of job {self.job.identity.job_id} failed: "
                       f"{err}; the job goes on running", 40, excerpt=getattr(err, "log_excerpt", ""))
            raise
        pids = procinfo.tree_pids(pid)
        tasks: list[TaskInfo] = procinfo.tasks(pid)
        files: list[OpenFile] = procinfo.open_files(pids)
        if not final:
            signal_tree(pids, signal.SIGCONT)
        frozen = time.monotonic() - t0
        try:
            self.engine.cpuinfo_dump(staging)
            t1 = time.monotonic()
            with self.store.publish(self.catalog, job_id=self.job.identity.job_id, engine=self.engine.name,
                                    node=self.node, **self._begin_kwargs()) as pub:
                meta = self._meta(pub.ckptid, pid)
                out = DeadlineWriter(pub.file, deadline)
                pack_dir(staging, out, meta, tasks=tasks, files=files,  # type: ignore[arg-type]
                         codec=self.pack.codec, level=self.pack.level, chunk_size=self.pack.chunk_size)
                ckptid, path = pub.ckptid, pub.path
        except (HpcckptError, OSError) as err:
            if final:
                signal_tree(pids, signal.SIGCONT)
            hlog.event(_log, "checkpoint.publish_failed", f"checkpoint of job {self.job.identity.job_id} was "
                       f"not published: {err}; the previous image stays the latest", 40)
            if isinstance(err, OSError):
                raise StoreError(f"writing the checkpoint failed: {err}",
                                 hint="check free space and permissions of the store") from err
            raise
        if final:
            signal_tree(list(reversed(pids)), signal.SIGKILL)
            frozen = time.monotonic() - t0
        size = path.stat().st_size
        pack_s = time.monotonic() - t1
        result = CheckpointResult(ckptid=ckptid, path=path, size_bytes=size, frozen_s=frozen,
                                  dump_s=dumped.frozen_s, pack_s=pack_s, total_s=time.monotonic() - t0, final=final)
        hlog.event(_log, "checkpoint.committed", f"checkpoint {ckptid} of job {self.job.identity.job_id} committed",
                   job_id=self.job.identity.job_id, **result.to_dict())
        if self.retention is not None:
            try:
                self.retention()
            except (HpcckptError, OSError) as err:  # a full store must not fail a good checkpoint
                hlog.event(_log, "checkpoint.retention_failed", f"retention failed: {err}", 30)
        return result

