"""Bring a job back from its latest valid image, falling back to older ones.

For each candidate image, newest first (or only the one asked for):

1. unpack it into a fresh private directory on tmpfs when the node has the
   memory for it (else node-local disk), verifying every byte on the way,
   and for an incremental image every chunk it takes from its parents
   (found through the catalog); nothing of a bad image is left behind, and
   CRIU never sees a byte that was not checked;
2. check that it is the checkpoint its catalog row names (ckptid, job,
   owner, parent: :mod:`hpcckpt.store.binding`), then that this node can
   run it: architecture from the header, the job's open files (pure logic
   in :func:`plan_files`), and every other path CRIU recorded and will
   check at restore: the program, its libraries, its cwd, with their modes
   and sizes (:func:`plan_paths`);
3. check the ids inside the CRIU images and the owner (``authorize_restore``),
   then ``criu cpuinfo check``;
4. only then cut grown output files back (policy ``restore.grown_files``),
   keeping every byte cut off (:mod:`hpcckpt.core.tails`), and run ``criu
   restore`` with fresh stdout/stderr pipes handed in with ``--inherit-fd``,
   with the credentials of the image's owner. If CRIU fails, the cut-off
   bytes are put back before anything else happens (an older image plans
   its own cut-back only then): a failed resume leaves every file as it was.

Root never restores a user's image with root's power: ``hpcckpt resume
--as-owner USER`` first becomes USER for good (:func:`hpcckpt.core.security.become`)
and then resumes exactly as USER would. Every id in the CRIU images must be
USER's; ids of 0 pass only in an image its runner recorded as taken of a job
in USER's own user namespace (``extra["userns"]``), which is restored into a
fresh one that maps 0 to USER alone.

A corrupt image, or a restore that CRIU refuses, makes us say so and try
the one before it; a corrupt one (damaged, or not the checkpoint its row
names) is also marked ``corrupt`` in the catalog, so that nothing offers it
again. A node or file mismatch (:class:`IncompatibleError`)
does not: older images of the same job need the same node and files, and
the user must be told what differs rather than be given an older state.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog, CkptRecord, Status
from hpcckpt.context import User, node_name
from hpcckpt.core.launch import scratch
from hpcckpt.core.launch.spawn import StdioPipes
from hpcckpt.core.lazyrestore import LazyRestore
from hpcckpt.core.lazyrestore import begin as begin_lazy
from hpcckpt.core.pipeline.staging import TMPFS, choose_staging
from hpcckpt.core.security import authorize_restore
from hpcckpt.core.tails import Tails
from hpcckpt.criu.engine import restore_needs_user_namespace
from hpcckpt.criu.images import RecordedPath, recorded_paths
from hpcckpt.criu.interface import CheckpointEngine, DumpOptions
from hpcckpt.errors import EngineError, HpcckptError, IncompatibleError, NotFoundError, UsageError
from hpcckpt.image import ImageSummary, OpenFile, read_header, unpack_image
from hpcckpt.image.errors import CorruptImageError, ImageError, UnsafeImageError
from hpcckpt.image.model import SectionInfo
from hpcckpt.image.parent import chain_info
from hpcckpt.image.stream import PreparedImage, is_bulk, prepare_image
from hpcckpt.store.binding import check_bound
from hpcckpt.store.resolve import CkptRef, Lookup, parent_resolver, ref_of

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
    files: Sequence[OpenFile], grown: str, stat: Callable[[str], FileState | None] = _stat,
    recreated: Collection[str] = (),
) -> FilePlan:
    """What to do about each file the job had open; every problem is collected, not just the first.

    ``recreated``: files this resume has just put back from the image (the job's temporary files,
    missing on this node): a new inode is expected for them.
    """
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
        if rec.inode and now.inode != rec.inode and now.dev == rec.dev and path not in recreated:
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


# Pseudo-filesystems: CRIU reopens their files in the restored namespaces, not as this node has them now;
# it recreates pty pairs (mpirun holds /dev/pts/N for its ranks' stdio) itself.
_PSEUDO = ("/proc/", "/sys/", "/dev/pts/")


def _mode_size(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mode, st.st_size


def plan_paths(
    recorded: Sequence[RecordedPath], open_files: Sequence[OpenFile],
    stat: Callable[[str], tuple[int, int] | None] = _mode_size,
) -> list[str]:
    """What CRIU would refuse at restore, found before anything is touched.

    Every path CRIU recorded (the program, each library it mapped, its cwd
    and root, each file it had open) must still exist with the mode it had,
    and a file whose size CRIU checks must have it. The job's open files are
    sized by :func:`plan_files` instead (grown ones are cut back).
    """
    sized_elsewhere = {f.path for f in open_files}
    problems: list[str] = []
    for r in recorded:
        if r.path.startswith(_PSEUDO):
            continue
        try:
            now = stat(r.path)
        except OSError as exc:
            problems.append(f"{r.path}: cannot be checked: {exc.strerror}")
            continue
        if now is None:
            problems.append(f"{r.path}: no longer exists (the job's program, a library it mapped, its working "
                            "directory or a file it had open)")
            continue
        mode, size = now
        if r.mode is not None and mode != r.mode:
            problems.append(f"{r.path}: its mode is {mode:o} now and was {r.mode:o} at the checkpoint")
        elif r.size is not None and r.path not in sized_elsewhere and size != r.size:
            problems.append(f"{r.path}: its size is {size} now and was {r.size} at the checkpoint")
    return problems


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
    lazy: LazyRestore | None = None  # memory still coming on demand (hpcckpt.core.lazyrestore)

    @property
    def interval(self) -> float | None:
        v = self.summary.meta.extra.get("interval")
        return float(v) if isinstance(v, (int, float)) else None


def catalog_refs(catalog: Catalog) -> Lookup:
    """A ckptid lookup over an open catalog, for resolving an incremental image's parents."""

    def lookup(ckptid: int) -> CkptRef | None:
        rec = catalog.get(ckptid)
        return None if rec is None else ref_of(rec)

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


def _streamed(info: SectionInfo) -> bool:
    """Which sections go to CRIU as streams: its bulk files, never the job's temporary files we put back."""
    return is_bulk(info) and not info.name.startswith(scratch.IMAGE_DIR + "/")


# Engines whose images CRIU did not write (hpcckpt.app): a program's own state, or its restart files.
APP_ENGINES = ("app", "files")


def _refuse_not_criu(rec: CkptRecord) -> None:
    """CRIU must never see an image it did not write: say what it is and how such a job goes on instead."""
    if rec.engine not in APP_ENGINES:
        return
    how = ("run the program again (its hpcckpt.Checkpointer restore() finds the checkpoint), or under "
           "'hpcckpt run --engine app -- COMMAND'" if rec.engine == "app" else
           "run it again under 'hpcckpt run --engine app --app-files GLOB -- COMMAND', which puts the files back")
    raise UsageError(
        f"checkpoint {rec.ckptid} of job {rec.job_id} was written by the program itself ({rec.engine} engine), "
        "not by CRIU: it cannot be restored as a process image, and no command to relaunch was recorded "
        "for the job (it was not started by 'hpcckpt run --engine app')",
        hint=how,
    )


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

    def _populate_scratch(self, summary: ImageSummary, unpacked: Path) -> list[str]:
        paths = summary.meta.extra.get("scratch")
        if not isinstance(paths, list) or summary.meta.uid != self.user.uid:
            return []  # another user's image is refused below, before anything is written
        mine = [str(p) for p in paths if isinstance(p, str) and os.path.isabs(p)
                and Path(p).parent.name == f"hpcckpt-{self.user.uid}"]
        try:
            created = scratch.populate(unpacked, self.user, mine)
        except (HpcckptError, OSError) as err:
            raise IncompatibleError(f"cannot put back the job's temporary directories: {err}",
                                    hint="check that TMPDIR and /dev/shm are writable on this node") from err
        if created:
            hlog.event(_log, "resume.scratch_restored", f"put back {len(created)} file(s) of the job's temporary "
                       "directories that this node did not have", files=created[:20])
        return created

    def candidates(self, job_id: str, ckptid: int | None = None) -> list[CkptRecord]:
        if ckptid is not None:
            rec = self.catalog.get(ckptid)
            if rec is None or rec.job_id != job_id or (rec.uid != self.user.uid and not self.user.is_root):
                raise NotFoundError(f"job {job_id} has no checkpoint {ckptid}",
                                    hint=f"see 'hpcckpt list {job_id}'")
            if rec.status != "committed":
                why = f" ({rec.error.splitlines()[0]})" if rec.error else ""
                raise NotFoundError(f"checkpoint {ckptid} of job {job_id} is {rec.status}{why}, not committed")
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
        candidates = [r for r in self.candidates(job_id, ckptid) if before is None or r.ckptid < before]
        if not candidates:
            raise NotFoundError(f"job {job_id} has no committed checkpoint older than {before}")
        if ckptid is None:
            fallbacks += self._skipped(job_id, candidates[0].ckptid)
        for rec in candidates:
            _refuse_not_criu(rec)
            try:
                restored = self._try_lazy_then_streamed(rec)
            except (ImageError, EngineError) as err:
                marked = self._mark_corrupt(rec, err)
                msg = f"checkpoint {rec.ckptid} of job {job_id} cannot be restored: {err}"
                if marked is not None:
                    msg += f" (checkpoint {marked} is now marked corrupt)"
                fallbacks.append(msg)
                self._event(rec, "fallback", f"{rec.ckptid}: {err}")
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

    def _skipped(self, job_id: str, newest: int) -> list[str]:
        """Newer images of the job than ``newest`` that were found corrupt before: said, not tried."""
        try:
            rows = self.catalog.list(job_id, uid=None if self.user.is_root else self.user.uid)
        except HpcckptError:
            return []
        out = []
        for r in rows:
            if r.ckptid > newest and r.status is Status.CORRUPT:
                why = r.error.splitlines()[0] if r.error else "no reason recorded"
                out.append(f"checkpoint {r.ckptid} of job {job_id} is marked corrupt ({why}); skipped")
        return out

    def _mark_corrupt(self, rec: CkptRecord, err: HpcckptError) -> int | None:
        """Mark the image an error proves bad (``rec``, or the parent it names) corrupt; its ckptid, if marked.

        Only damage is marked: an unreadable file (maybe a passing I/O error), a format this version
        does not know, or a restore CRIU refused are not the image's fault.
        """
        if not isinstance(err, (CorruptImageError, UnsafeImageError)):
            return None
        where = getattr(err, "path", None)
        target: CkptRecord | None = rec
        seen: set[int] = set()
        while where is not None and target is not None and str(where) != target.path:
            seen.add(target.ckptid)  # the error is about a parent: find it up the chain
            parent = target.parent
            target = self.catalog.get(parent) if parent is not None and parent not in seen else None
        if target is None:
            return None
        try:
            return target.ckptid if self.catalog.mark_corrupt(target.ckptid, str(err)) else None
        except HpcckptError as exc:
            hlog.event(_log, "resume.unmarked", f"could not mark checkpoint {target.ckptid} corrupt: {exc}", 30)
            return None

    def _tails_root(self, rec: CkptRecord) -> Path:
        # Node-local disk, never tmpfs: a tail can be as large as everything the job wrote since.
        disk = choose_staging(self.user, rec.job_id, 0, disk_root=self.disk_staging, tmpfs=None)
        for old in sorted(disk.root.glob("tails-*")):
            # Only a resume killed between its cut-back and CRIU's end leaves these: say so every time.
            hlog.event(_log, "resume.tails_left", f"{old}: tails cut off by an earlier resume that did not finish; "
                       "its files may be short by these bytes (tails.json there says which file each tail-N "
                       "is the end of: append it to that file by hand)", 30, path=str(old))
        return disk.root / f"tails-{os.getpid()}-{rec.ckptid}"

    def _event(self, rec: CkptRecord, event: str, detail: str) -> None:
        """A job event (``restore``, ``fallback``) that metrics and ``hpcckpt report`` count."""
        try:
            self.catalog.record_job_event(rec.job_id, uid=rec.uid, event=event, detail=detail[:2000],
                                          node=node_name())
        except HpcckptError as err:
            hlog.event(_log, "resume.unrecorded", f"could not record the {event}: {err}", 30)

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
        tails: Tails | None = None
        lazy: LazyRestore | None = None
        try:
            cpu = EarlyCpuCheck(self.engine)
            if stream:
                # Checks the whole image but the chunk data of its memory pages, which is checked chunk
                # by chunk as CRIU reads it (hpcckpt.image.stream): no byte reaches CRIU unchecked.
                prepared = prepare_image(image, dest, self.resolve_parent, on_verified={cpu.NAME: cpu.feed},
                                         bulk=_streamed)
                summary = prepared.summary
            else:
                # Checks every byte (and every chunk taken from a parent) while writing; a bad image
                # leaves nothing.
                summary = unpack_image(image, dest, self.resolve_parent, on_verified={cpu.NAME: cpu.feed})
            # The image must be the checkpoint its row names (not a copy of another one).
            check_bound(summary.meta, ref_of(rec), str(image))
            # The job's own temporary directories, as they were at the checkpoint, where they are missing
            # (on another node): CRIU reopens OpenMPI's session files and shared memory there.
            recreated = self._populate_scratch(summary, dest)
            # Everything that can be checked is, before any file of the user's is touched.
            check_system(summary)
            plan = plan_files(summary.files, self.grown_files, recreated=set(recreated))
            problems = list(plan.problems)
            if (dest / "files.img").is_file():
                problems += plan_paths(recorded_paths(dest), summary.files)
            if problems:
                raise IncompatibleError(
                    f"checkpoint {rec.ckptid} of job {rec.job_id} does not match this node's files now:\n  "
                    + "\n  ".join(problems),
                    hint="restore the files as they were, or set restore.grown_files; no file was changed "
                    "and CRIU was not started",
                )
            # The caller must be the owner: root restores a user's image only after becoming them.
            # Namespace ids (all 0) are accepted only for a job its runner recorded as running in a
            # user namespace of its own; the kernel maps them to the caller and nobody else.
            authorize_restore(image, dest, self.user, header_uid=summary.meta.uid, record_uid=rec.uid,
                              namespaced=summary.meta.extra.get("userns") is True
                              and restore_needs_user_namespace(dest, euid=os.geteuid()))
            tails = Tails(self._tails_root(rec)) if plan.truncate else None

            def last_checks() -> None:
                # The CPU check (an exec of CRIU), then cutting grown files back: only once it passed.
                # Each tail cut off is kept until CRIU has succeeded, and put back if it fails.
                if summary.meta.extra.get("cpuinfo"):
                    ok, why = cpu.answer(dest)
                    if not ok:
                        raise IncompatibleError(
                            f"this node's CPU lacks features the checkpointed job uses:\n{why}",
                            hint="resume it on a node with the same CPU model (or newer)")
                for path, size, inode in plan.truncate:
                    assert tails is not None
                    tails.cut(path, size, inode)

            if prepared is not None and lazy_ok:
                lazy = begin_lazy(self.engine, prepared, mode=self.lazy, threshold=self.lazy_threshold)
                self._lazy_started = lazy is not None
            streamer = prepared is not None and lazy is None
            pipes = StdioPipes.create()
            try:
                if not streamer:
                    last_checks()
                stdio = summary.meta.extra.get("stdio") or {}
                inherit = {}
                if isinstance(stdio, dict):
                    for job_fd, ours in (("1", pipes.out_w), ("2", pipes.err_w)):
                        if isinstance(stdio.get(job_fd), str):
                            inherit[ours] = str(stdio[job_fd])
                # Streamed, CRIU starts while the CPU check runs: the streamer serves it nothing, not
                # even its inventory, until last_checks() has passed (and CRIU fails if they do not).
                res = self.engine.restore(dest, options=self.options.for_image(summary.meta.extra),
                                          inherit_fds=inherit,
                                          source=prepared.open if streamer and prepared is not None else None,
                                          gate=last_checks if streamer else None,
                                          lazy_pages=lazy is not None)
            except BaseException:
                for fd in (pipes.out_r, pipes.err_r):
                    os.close(fd)
                pipes.close_write_ends()
                if tails is not None:
                    tails.put_back()  # before any older image plans its own cut-back
                raise
            pipes.close_write_ends()
            if tails is not None:
                tails.drop()
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
        self._event(rec, "restore", str(rec.ckptid))
        hlog.event(_log, "resume.restored", f"job {rec.job_id} restored from checkpoint {rec.ckptid}",
                   ckptid=rec.ckptid, pid=res.pid, seconds=round(res.seconds, 3), staging=choice.kind,
                   parents=summary.parents, streamed=prepared is not None, lazy=lazy is not None)
        return Restored(pid=res.pid, ckptid=rec.ckptid, record=rec, summary=summary, pipes=pipes,
                        fallbacks=[], restore_s=res.seconds, image=image, staging=choice.kind,
                        streamed=prepared is not None, lazy=lazy)
