"""Node-local staging: where a dump lands so the job can run on before the store has it.

tmpfs is fastest, but its pages are the node's RAM: a dump the size of the
job's memory, plus the job itself, must fit, or the kernel swaps or the OOM
killer picks the job. So tmpfs is chosen only when both its free space and
the node's available memory cover the job's RSS times a safety factor;
otherwise the site's node-local disk (``storage.staging``) is used.

A staged checkpoint is one directory::

    STAGE/stage-<time ns>-<pid>/
        dump/        the engine's files (CRIU images), 0700
        meta.json    the image metadata, tasks and open files (written complete, then renamed)
        .done        completion marker, created last: only now may it be flushed or salvaged

A directory without ``.done`` is an interrupted dump and is only ever deleted.
The epilog runs as root over directories the job's user owns, so everything
here is opened relative to directory descriptors without following symlinks.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from hpcckpt import log as hlog
from hpcckpt.context import User
from hpcckpt.errors import StoreError, UnsafePathError
from hpcckpt.fs import safe as fsutil
from hpcckpt.fs.layout import DONE_MARKER, STAGE_PREFIX, TMPFS, TMPFS_SUBDIR, StagingLayout
from hpcckpt.fs.tree import remove_tree_at
from hpcckpt.image.model import (
    FieldError,
    ImageMeta,
    OpenFile,
    TaskInfo,
    files_from_json,
    meta_from_json,
    tasks_from_json,
)

_log = hlog.get("staging")
DEFAULT_FACTOR = 1.5  # dump ~ RSS, plus headroom for the page cache and the job growing
META_FILE = "meta.json"
DUMP_DIR = "dump"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_META = 64 << 20


@dataclass(frozen=True)
class StagingChoice:
    root: Path  # the job's private staging directory (created, 0700)
    kind: str  # "tmpfs" | "disk"
    reason: str


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def job_rss(pid: int) -> int:
    """Resident memory of a process tree (what its dump will roughly weigh)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def staging_candidates(user: User, job_id: str, disk_root: Path | None, tmpfs: Path = TMPFS) -> list[Path]:
    """Every place a job's staging may be, for the epilog to look in."""
    return StagingLayout(Path(disk_root) if disk_root is not None else None, tmpfs).candidates(user, job_id)


def choose_staging(
    user: User,
    job_id: str,
    rss: int,
    *,
    disk_root: Path | None,
    tmpfs: Path | None = TMPFS,
    factor: float = DEFAULT_FACTOR,
    mem_available: int | None = None,
) -> StagingChoice:
    """The job's staging directory: tmpfs if the node can hold a dump of ``rss`` bytes, else disk.

    ``disk_root`` is the policy's ``storage.staging`` (node-local disk); the
    directory made is ``ROOT/USER/JOB`` in either place, 0700, owned by the user.
    ``tmpfs`` None never uses tmpfs; otherwise only a trusted
    ``TMPFS/hpcckpt-staging`` is used (see :func:`tmpfs_base`).
    """
    need = int(rss * factor)
    avail = psutil.virtual_memory().available if mem_available is None else mem_available
    tbase = tmpfs_base(tmpfs) if tmpfs is not None else None
    tmpfs_free = _free_bytes(tbase) if tbase is not None else 0
    if tbase is not None and tmpfs_free >= need and avail >= need:
        base = tbase
        kind = "tmpfs"
        reason = f"tmpfs has {tmpfs_free} bytes free and the node {avail} available, job needs ~{need}"
    elif disk_root is not None:
        base = Path(disk_root)
        kind = "disk"
        reason = (f"tmpfs too small for ~{need} bytes (free {tmpfs_free}, available memory {avail}); "
                  f"using storage.staging" if tbase is not None else
                  f"no trusted {TMPFS_SUBDIR} directory on tmpfs; using storage.staging")
    else:
        raise StoreError(
            f"no staging for a job of {rss} bytes: tmpfs {tmpfs} has {tmpfs_free} bytes free, "
            f"the node {avail} available, and storage.staging is not set",
            hint="set storage.staging to a node-local disk directory in the policy, or turn off "
            "pipeline.async_flush",
        )
    layout = StagingLayout(Path(disk_root) if disk_root is not None else None, tmpfs)
    path = layout.job_dir(base, user, job_id)
    try:
        fsutil.ensure_private_dir(path, user.uid, user.gid, base=base)
    except StoreError as exc:
        if kind != "tmpfs" or disk_root is None:
            raise
        # A tmpfs staging area the admin made for root-run jobs only: node-local disk will do.
        path = layout.job_dir(Path(disk_root), user, job_id)
        fsutil.ensure_private_dir(path, user.uid, user.gid, base=Path(disk_root))
        return StagingChoice(path, "disk", f"{reason}; but {exc.message}; using storage.staging")
    return StagingChoice(path, kind, reason)


def tmpfs_base(tmpfs: Path = TMPFS, *, create: bool = True) -> Path | None:
    """``TMPFS/hpcckpt-staging`` if it is a directory only root (or we) may write, else None.

    tmpfs is world-writable: a directory another user made there first, or a
    symlink, would put our dumps (and the tree the root epilog walks) in
    their hands. Root makes it (0755) when missing and ``create`` is set, as
    the Slurm prolog does; anyone else only uses one that is already there
    and safe. A base that exists but is not safe is logged and refused.
    """
    base = Path(tmpfs) / TMPFS_SUBDIR
    if not os.path.isdir(tmpfs):
        return None
    if create and fsutil.running_as_root():
        with contextlib.suppress(FileExistsError):
            os.mkdir(base, 0o755)
    try:
        st = os.lstat(base)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or stat.S_IMODE(st.st_mode) & 0o022:
        hlog.event(_log, "staging.tmpfs_refused", f"{base}: not a directory of root's that only root may write "
                   f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); tmpfs staging left alone", 40,
                   path=str(base))
        return None
    return base


def _write_file_at(dir_fd: int, name: str, data: bytes, user: User) -> None:
    tmp = fsutil.temp_name(name)
    fd = fsutil.open_private_file_at(dir_fd, tmp, user.uid, user.gid)
    try:
        view = memoryview(data)
        while view.nbytes:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _read_file_at(dir_fd: int, name: str, limit: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{name}: not a regular file")
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > limit:
                raise StoreError(f"{name}: larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass
class StagedCheckpoint:
    """One staged dump, identified by its directory name (unique per node and time)."""

    path: Path
    meta: ImageMeta | None = None
    tasks: list[TaskInfo] = field(default_factory=list)
    files: list[OpenFile] = field(default_factory=list)
    begin: dict[str, Any] = field(default_factory=dict)  # extra Catalog.begin keywords (step, array ids...)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dump_dir(self) -> Path:
        return self.path / DUMP_DIR

    def pack_source(self) -> str:
        """The directory pack_dir reads (the epilog pins it to an opened descriptor)."""
        return os.fspath(self.dump_dir)

    @classmethod
    def create(cls, stage_root: Path, user: User) -> StagedCheckpoint:
        """A fresh staging directory with an empty ``dump/`` for the engine to write into."""
        name = f"{STAGE_PREFIX}{time.time_ns()}-{os.getpid()}"
        path = Path(stage_root) / name
        fsutil.ensure_private_dir(path / DUMP_DIR, user.uid, user.gid, base=Path(stage_root))
        return cls(path)

    def mark_done(
        self,
        meta: ImageMeta,
        user: User,
        *,
        tasks: Sequence[TaskInfo] = (),
        files: Sequence[OpenFile] = (),
        begin: dict[str, Any] | None = None,
    ) -> None:
        """Record the metadata, then the completion marker (last, both fsynced)."""
        doc = {
            "meta": meta.to_dict(), "tasks": [asdict(t) for t in tasks], "files": [asdict(f) for f in files],
            "begin": dict(begin or {}),
        }
        fd = os.open(self.path, _DIR_FLAGS)
        try:
            _write_file_at(fd, META_FILE, json.dumps(doc).encode(), user)
            mfd = fsutil.open_private_file_at(fd, DONE_MARKER, user.uid, user.gid)
            os.fsync(mfd)
            os.close(mfd)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.meta, self.tasks, self.files, self.begin = meta, list(tasks), list(files), dict(begin or {})

    @classmethod
    def load(cls, stage_fd: int, name: str, stage_root: Path) -> StagedCheckpoint | None:
        """The staged checkpoint ``name`` below ``stage_fd`` if complete (marker and metadata), else None."""
        fd = os.open(name, _DIR_FLAGS, dir_fd=stage_fd)
        try:
            try:
                st = os.stat(DONE_MARKER, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if not stat.S_ISREG(st.st_mode):
                return None
            doc = json.loads(_read_file_at(fd, META_FILE, _MAX_META))
            if not isinstance(doc, dict) or not isinstance(doc.get("begin", {}), dict):
                raise FieldError("meta.json is not an object with a 'begin' object")
            staged = cls(Path(stage_root) / name, meta_from_json(doc.get("meta")),
                         tasks_from_json(doc.get("tasks", [])), files_from_json(doc.get("files", [])),
                         dict(doc.get("begin", {})))
            dst = os.stat(DUMP_DIR, dir_fd=fd, follow_symlinks=False)
            return staged if stat.S_ISDIR(dst.st_mode) else None
        except (ValueError, FileNotFoundError, UnsafePathError):
            return None  # FieldError and JSON errors are ValueErrors: an unusable stage
        finally:
            os.close(fd)

    def remove(self) -> None:
        try:
            pfd = os.open(self.path.parent, _DIR_FLAGS)
        except FileNotFoundError:
            return
        try:
            remove_tree_at(pfd, self.name)
        finally:
            os.close(pfd)
