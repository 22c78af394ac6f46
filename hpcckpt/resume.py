"""Bring a job back from its latest valid image, falling back to older ones.

For each candidate image, newest first (or only the one asked for):

1. unpack it into a fresh private directory on tmpfs when the node has the
   memory for it (else node-local disk), verifying every byte on the way,
   and for an incremental image every chunk it takes from its parents
   (found through the catalog); nothing of a bad image is left behind, and
   CRIU never sees a byte that was not checked;
2. check this node can run it: architecture from the header, then the
   job's open files (pure logic in :func:`plan_files`);
3. check the ids inside the CRIU images and the owner (``authorize_restore``),
   then ``criu cpuinfo check``;
4. only then fix up grown output files (policy ``restore.grown_files``) and
   run ``criu restore`` with fresh stdout/stderr pipes handed in with
   ``--inherit-fd``, with the credentials of the image's owner.

Root never restores a user's image with root's power: ``hpcckpt resume
--as-owner USER`` first becomes USER for good (:func:`hpcckpt.security.become`)
and then resumes exactly as USER would. Every id in the CRIU images must be
USER's; ids of 0 pass only in an image its runner recorded as taken of a job
in USER's own user namespace (``extra["userns"]``), which is restored into a
fresh one that maps 0 to USER alone.

A corrupt image, or a restore that CRIU refuses, makes us say so and try
the one before it. A node or file mismatch (:class:`IncompatibleError`)
does not: older images of the same job need the same node and files, and
the user must be told what differs rather than be given an older state.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog, CkptRecord
from hpcckpt.context import User, node_name
from hpcckpt.engine.base import CheckpointEngine, DumpOptions
from hpcckpt.engine.criu import restore_needs_user_namespace
from hpcckpt.errors import (
    EngineError,
    HpcckptError,
    ImageError,
    IncompatibleError,
    NotFoundError,
    UsageError,
)
from hpcckpt.image import ImageSummary, OpenFile, read_header, unpack_image
from hpcckpt.image.parent import chain_info
from hpcckpt.image.resolve import CkptRef, Lookup, parent_resolver
from hpcckpt.image.stream import PreparedImage, prepare_image
from hpcckpt.lazyrestore import LazyRestore
from hpcckpt.lazyrestore import begin as begin_lazy
from hpcckpt.pipeline.staging import TMPFS, choose_staging
from hpcckpt.runner.launch import StdioPipes
from hpcckpt.security import authorize_restore

_log = hlog.get("resume")
GROWN_CHOICES = ("truncate", "keep", "refuse")
# Staging a streamed restore needs: the image's small files only (bulk ones are streamed).
STREAM_STAGING = 64 << 20


@dataclass
class FileState:
    """What a path is now: ``None`` fields mean it does not exist."""

    size: int
    mtime_ns: int
    inode: int
    dev: int


@dataclass
class FilePlan:
    truncate: list[tuple[str, int, int]] = field(default_factory=list)  # (path, size, inode)
    problems: list[str] = field(default_factory=list)


def _stat(path: str) -> FileState | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return FileState(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def plan_files(
    files: Sequence[OpenFile], grown: str, stat: Callable[[str], FileState | None] = _stat
) -> FilePlan:
    """What to do about each file the job had open; every problem is collected, not just the first."""
    if grown not in GROWN_CHOICES:
        raise UsageError(f"restore.grown_files must be one of {', '.join(GROWN_CHOICES)}, not {grown!r}")
    by_path: dict[str, list[OpenFile]] = {}
    for f in files:
        by_path.setdefault(f.path, []).append(f)
    plan = FilePlan()
    for path, recs in sorted(by_path.items()):
        rec = max(recs, key=lambda r: r.size)
        writer = any(r.mode != "r" for r in recs)
        now = stat(path)
        if now is None:
            plan.problems.append(f"{path}: the job had it open but it no longer exists")
            continue
        if rec.inode and now.inode != rec.inode and now.dev == rec.dev:
            plan.problems.append(f"{path}: was replaced by another file since the checkpoint (inode "
                                 f"{rec.inode} -> {now.inode})")
            continue
        if now.size < rec.size:
            plan.problems.append(f"{path}: shrank from {rec.size} to {now.size} bytes since the checkpoint")
            continue
        if not writer:
            if now.size != rec.size or now.mtime_ns != rec.mtime_ns:
                plan.problems.append(f"{path}: the job reads this file and it changed since the checkpoint "
                                     f"(size {rec.size} -> {now.size})")
            continue
        if now.size > rec.size:
            if grown == "refuse":
                plan.problems.append(f"{path}: grew from {rec.size} to {now.size} bytes since the checkpoint "
                                     "(policy restore.grown_files is 'refuse')")
            elif grown == "truncate":
                plan.truncate.append((path, rec.size, now.inode))
    return plan


def truncate_file(path: str, size: int, inode: int) -> None:
    """Cut ``path`` back to ``size``, never through a symlink and only if it is still that inode."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != inode:
            raise IncompatibleError(f"{path}: was replaced while preparing the restore")
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_system(summary: ImageSummary) -> None:
    header = summary.header
    arch = header.get("arch") or header.get("machine")
    here = os.uname()
    if arch and arch != here.machine:
        raise IncompatibleError(f"the image was taken on {arch} and this node is {here.machine}",
                                hint="resume it on a node of the same architecture")


@dataclass
class Restored:
    pid: int
    ckptid: int
    record: CkptRecord
    summary: ImageSummary
    pipes: StdioPipes
    fallbacks: list[str]
    restore_s: float
    image: Path | None = None  # the image restored from: the parent of the next checkpoint
    staging: str = ""  # where it was unpacked: "tmpfs" | "disk"
    streamed: bool = False  # memory pages streamed to CRIU rather than unpacked first
    lazy: LazyRestore | None = None  # memory still coming on demand (hpcckpt.lazyrestore)

    @property
    def interval(self) -> float | None:
        v = self.summary.meta.extra.get("interval")
        return float(v) if isinstance(v, (int, float)) else None


def catalog_refs(catalog: Catalog) -> Lookup:
    """A ckptid lookup over an open catalog, for resolving an incremental image's parents."""

    def lookup(ckptid: int) -> CkptRef | None:
        rec = catalog.get(ckptid)
        if rec is None:
            return None
        return CkptRef(ckptid=rec.ckptid, uid=rec.uid, path=rec.path or "",
                       status=str(getattr(rec.status, "value", rec.status)))

    return lookup


class HeaderFacts(NamedTuple):
    unpacked_bytes: int  # what unpacking the image takes (0 when its header cannot be read)
    predumped: bool  # it holds a CRIU pre-dump as parent/, which criu restore --stream cannot read


def header_facts(image: Path) -> HeaderFacts:
    """What the restore plans by, from the image's header alone (no full read).

    An incremental file is small but unpacks to its whole chain's memory, so
    the chain's full image counts too; images compress up to about 2:1. An
    unreadable header gives zeros: the unpack that follows says what is wrong.
    """
    try:
        size = image.stat().st_size
        meta = read_header(image)
    except (OSError, ImageError):
        return HeaderFacts(0, False)
    base = chain_info(meta, str(image)).get("base_bytes", 0) if meta.parent_ckptid else 0
    return HeaderFacts(2 * (size + base), meta.extra.get("predump") is True)


class EarlyCpuCheck:
    """``criu cpuinfo check`` of an image's cpuinfo.img, run while the rest of the image unpacks.

    The check is an exec of CRIU (tens of milliseconds) that needs only
    cpuinfo.img, whose bytes are checked long before the memory pages are;
    started from :func:`unpack_image`'s ``on_verified``, it costs a restore
    nothing. It works on a private copy in a fresh directory of our own
    (never in the user-writable staging, where CRIU would write its log), and
    its answer is used only once the whole image has been verified.
    """

    NAME = "cpuinfo.img"

    def __init__(self, engine: CheckpointEngine) -> None:
        self.engine = engine
        self._thread: threading.Thread | None = None
        self._answer: tuple[bool, str] | None = None
        self._error: HpcckptError | OSError | None = None

    def feed(self, data: bytes) -> None:
        self._thread = threading.Thread(target=self._run, args=(data,), name="hpcckpt-cpuinfo", daemon=True)
        self._thread.start()

    def _run(self, data: bytes) -> None:
        try:
            scratch = tempfile.mkdtemp(prefix="hpcckpt-cpuinfo-")  # 0700, ours
            try:
                fd = os.open(os.path.join(scratch, self.NAME),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    view = memoryview(data)
                    while view.nbytes:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                self._answer = self.engine.cpuinfo_check(Path(scratch))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        except (HpcckptError, OSError) as err:
            self._error = err

    def answer(self, images_dir: Path) -> tuple[bool, str]:
        """The early answer; checked in ``images_dir`` now if the early check did not run or failed to run."""
        if self._thread is not None:
            self._thread.join()
            if self._answer is not None:
                return self._answer
            hlog.event(_log, "resume.cpuinfo_early_failed", f"early cpuinfo check did not run: {self._error}; "
                       "checking again", 10)
        return self.engine.cpuinfo_check(images_dir)


class Resumer:
    def __init__(
        self,
        *,
        engine: CheckpointEngine,
        catalog: Catalog,
        user: User,
        disk_staging: Path,
        options: DumpOptions,
        grown_files: str = "truncate",
        tmpfs: Path | None = TMPFS,
        stream: bool = True,
        lazy: str = "off",
        lazy_threshold: int = 0,
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.user = user
        self.disk_staging = disk_staging
        self.tmpfs = tmpfs
        self.options = options
        self.grown_files = grown_files
        self.stream = stream
        self.lazy, self.lazy_threshold = lazy, lazy_threshold
        self._lazy_started = False
        self.resolve_parent = parent_resolver(user, catalog_refs(catalog))

    def candidates(self, job_id: str, ckptid: int | None = None) -> list[CkptRecord]:
        if ckptid is not None:
            rec = self.catalog.get(ckptid)
            if rec is None or rec.job_id != job_id or (rec.uid != self.user.uid and not self.user.is_root):
                raise NotFoundError(f"job {job_id} has no checkpoint {ckptid}",
                                    hint=f"see 'hpcckpt list {job_id}'")
            if rec.status != "committed":
                raise NotFoundError(f"checkpoint {ckptid} of job {job_id} is {rec.status}, not committed")
            return [rec]
        recs = self.catalog.committed(job_id, uid=None if self.user.is_root else self.user.uid)
        if not recs:
            raise NotFoundError(f"job {job_id} has no committed checkpoint",
                                hint="see 'hpcckpt list'; checkpoints are filed under the Slurm job id or --job-id")
        return recs

    def resume(self, job_id: str, ckptid: int | None = None, before: int | None = None) -> Restored:
        """``before``: only checkpoints older than that one (a lazy restore of it failed while the job ran)."""
        fallbacks: list[str] = []
        last: HpcckptError | None = None
        recs = [r for r in self.candidates(job_id, ckptid) if before is None or r.ckptid < before]
        if not recs:
            raise NotFoundError(f"job {job_id} has no committed checkpoint older than {before}")
        for rec in recs:
            try:
                restored = self._try_lazy_then_streamed(rec)
            except (ImageError, EngineError) as err:
                msg = f"checkpoint {rec.ckptid} of job {job_id} cannot be restored: {err}"
                fallbacks.append(msg)
                hlog.event(_log, "resume.fallback", msg + "; trying the one before it", 30, ckptid=rec.ckptid,
                           excerpt=getattr(err, "log_excerpt", ""))
                last = err
                continue
            restored.fallbacks = fallbacks
            return restored
        assert last is not None
        if len(fallbacks) > 1:
            last.message += f" (and {len(fallbacks) - 1} newer checkpoint(s) failed too)"
        raise last

    def _try_lazy_then_streamed(self, rec: CkptRecord) -> Restored:
        """CRIU refusing a lazy restore (the node's userfaultfd, the daemon) is no fault of the image."""
        self._lazy_started = False
        try:
            return self._try(rec)
        except EngineError as err:
            if not self._lazy_started:
                raise
            hlog.event(_log, "resume.lazy_refused", f"lazy restore of checkpoint {rec.ckptid} failed: {err}; "
                       "restoring it streamed", 30, ckptid=rec.ckptid, excerpt=getattr(err, "log_excerpt", ""))
            return self._try(rec, lazy_ok=False)

    def _try(self, rec: CkptRecord, lazy_ok: bool = True) -> Restored:
        image = Path(rec.path)
        need, predumped = header_facts(image)
        stream = self.stream and not predumped
        if stream:
            need = min(need, STREAM_STAGING)  # only the small files are unpacked; the memory is streamed
        choice = choose_staging(self.user, rec.job_id, need, disk_root=self.disk_staging, tmpfs=self.tmpfs)
        dest = choice.root / f"restore-{os.getpid()}-{rec.ckptid}"
        if dest.exists():
            shutil.rmtree(dest)
        prepared: PreparedImage | None = None
        lazy: LazyRestore | None = None
        try:
            cpu = EarlyCpuCheck(self.engine)
            if stream:
                # Checks the whole image but the chunk data of its memory pages, which is checked chunk
                # by chunk as CRIU reads it (hpcckpt.image.stream): no byte reaches CRIU unchecked.
                prepared = prepare_image(image, dest, self.resolve_parent, on_verified={cpu.NAME: cpu.feed})
                summary = prepared.summary
            else:
                # Checks every byte (and every chunk taken from a parent) while writing; a bad image
                # leaves nothing.
                summary = unpack_image(image, dest, self.resolve_parent, on_verified={cpu.NAME: cpu.feed})
            check_system(summary)
            plan = plan_files(summary.files, self.grown_files)
            if plan.problems:
                raise IncompatibleError(
                    f"checkpoint {rec.ckptid} of job {rec.job_id} does not match the job's files now:\n  "
                    + "\n  ".join(plan.problems),
                    hint="restore the files as they were, or set restore.grown_files; CRIU was not started",
                )
            # The caller must be the owner: root restores a user's image only after becoming them.
            # Namespace ids (all 0) are accepted only for a job its runner recorded as running in a
            # user namespace of its own; the kernel maps them to the caller and nobody else.
            authorize_restore(image, dest, self.user, header_uid=summary.meta.uid, record_uid=rec.uid,
                              namespaced=summary.meta.extra.get("userns") is True
                              and restore_needs_user_namespace(dest, euid=os.geteuid()))
            def last_checks() -> None:
                # The CPU check (an exec of CRIU), then cutting grown files back: only once it passed.
                if summary.meta.extra.get("cpuinfo"):
                    ok, why = cpu.answer(dest)
                    if not ok:
                        raise IncompatibleError(
                            f"this node's CPU lacks features the checkpointed job uses:\n{why}",
                            hint="resume it on a node with the same CPU model (or newer)")
                for path, size, inode in plan.truncate:
                    hlog.event(_log, "resume.truncated", f"{path}: cut back to its checkpointed size {size}",
                               path=path, size=size)
                    truncate_file(path, size, inode)

            if prepared is not None and lazy_ok:
                lazy = begin_lazy(self.engine, prepared, mode=self.lazy, threshold=self.lazy_threshold)
                self._lazy_started = lazy is not None
            if prepared is None or lazy is not None:
                last_checks()
            pipes = StdioPipes.create()
            stdio = summary.meta.extra.get("stdio") or {}
            inherit = {}
            if isinstance(stdio, dict):
                for job_fd, ours in (("1", pipes.out_w), ("2", pipes.err_w)):
                    if isinstance(stdio.get(job_fd), str):
                        inherit[ours] = str(stdio[job_fd])
            try:
                # Streamed, CRIU starts while the CPU check runs: the streamer serves it nothing, not
                # even its inventory, until last_checks() has passed (and CRIU fails if they do not).
                res = self.engine.restore(dest, options=self.options.for_image(summary.meta.extra),
                                          inherit_fds=inherit,
                                          source=prepared.open if prepared is not None and not lazy else None,
                                          gate=last_checks if prepared is not None and not lazy else None,
                                          lazy_pages=lazy is not None)
            except BaseException:
                for fd in (pipes.out_r, pipes.err_r):
                    os.close(fd)
                pipes.close_write_ends()
                raise
            pipes.close_write_ends()
            if lazy is not None:
                lazy.attach(res.pid)
        except BaseException:
            if lazy is not None:
                lazy.abort()
            raise
        finally:
            if lazy is None:  # else the lazy restore owns them until every page is resident
                if prepared is not None:
                    prepared.close()
                shutil.rmtree(dest, ignore_errors=True)
        try:
            self.catalog.record_resume(rec.ckptid, resumed_by=f"hpcckpt@{node_name()}",
                                       new_job_id=os.environ.get("SLURM_JOB_ID"))
        except HpcckptError as err:
            hlog.event(_log, "resume.unrecorded", f"could not record the resume: {err}", 30)
        hlog.event(_log, "resume.restored", f"job {rec.job_id} restored from checkpoint {rec.ckptid}",
                   ckptid=rec.ckptid, pid=res.pid, seconds=round(res.seconds, 3), staging=choice.kind,
                   parents=summary.parents, streamed=prepared is not None, lazy=lazy is not None)
        return Restored(pid=res.pid, ckptid=rec.ckptid, record=rec, summary=summary, pipes=pipes,
                        fallbacks=[], restore_s=res.seconds, image=image, staging=choice.kind,
                        streamed=prepared is not None, lazy=lazy)

