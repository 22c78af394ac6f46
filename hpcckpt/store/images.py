"""Where images live: ``ROOT/USER/<safe job id>/ckpt-<ckptid>.hck``, and how they get there.

Publishing an image is the only way one appears, and it is ordered so that a
crash at any instant leaves either a committed image with its catalog row, or
nothing a reader would take:

1. ``cat.begin`` - row ``writing`` (readers only take ``committed`` rows);
2. write ``.tmp-ckpt-N.hck.<pid>.<rand>`` in the job dir (0600, O_EXCL|O_NOFOLLOW);
3. flush and fsync the file;
4. rename it to ``ckpt-N.hck``;
5. fsync the directory, so the rename survives a power cut;
6. ``cat.commit`` - only now does a reader see it.

A writer that dies leaves a temp file or an uncommitted final file and a
``writing`` row; ``gc`` removes both and marks the row failed (see
``hpcckpt.store.gc``). Directories are 0700 and files 0600, owned by the
job's user even when root writes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import psutil

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog, CkptRecord
from hpcckpt.context import User
from hpcckpt.errors import NotFoundError, StoreError, UnsafePathError
from hpcckpt.fs.layout import StoreLayout, image_name
from hpcckpt.fs.safe import (
    TEMP_PREFIX,
    is_safe_component,
    iter_dir_nofollow,
    open_private_dir,
    open_private_file_at,
    temp_name,
)

# Companion files belong to a checkpoint without being its image, such as the
# per-rank shards of an application-assisted checkpoint (``ckpt-N.r3.hck``):
# they live and die with checkpoint N.
_IMAGE_NAME = re.compile(r"ckpt-([1-9][0-9]*)(?:\.([a-z][a-z0-9]{0,15}))?\.hck")
_log = hlog.get("store")

#: Steps of a publish, in order; ``step_hook`` is called after each (crash tests kill here).
PUBLISH_STEPS = ("begun", "opened", "written", "fsynced", "renamed", "dir_synced", "committed")


def parse_image_name(name: str) -> int | None:
    """The ckptid of a checkpoint's image file name; None for anything else (companions included)."""
    m = _IMAGE_NAME.fullmatch(name)
    return int(m.group(1)) if m and m.group(2) is None else None


def parse_store_name(name: str) -> tuple[int, str | None] | None:
    """(ckptid, companion tag or None) for an image or companion file name."""
    m = _IMAGE_NAME.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


def writer_identity() -> dict[str, Any]:
    """Who is writing, so gc can tell a live writer from a dead one (pid reuse included)."""
    pid = os.getpid()
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = 0.0
    return {"node": socket.gethostname(), "pid": pid, "start": started}


def writer_alive(writer: dict[str, Any]) -> bool | None:
    """True/False for a writer on this node; None when it ran elsewhere and we cannot know."""
    if writer.get("node") != socket.gethostname():
        return None
    try:
        proc = psutil.Process(int(writer.get("pid", -1)))
        return abs(proc.create_time() - float(writer.get("start", 0.0))) < 1.0
    except (psutil.Error, ValueError):
        return False


@dataclass
class Publication:
    """What a writer gets inside ``Store.publish``: write the image into ``file``."""

    ckptid: int
    path: Path
    file: BinaryIO
    temp_path: Path
    started: float = field(default_factory=time.monotonic)
    # Merged into the row's meta by the commit (what the writer measured, for metrics and reports).
    meta: dict[str, Any] = field(default_factory=dict)


class Store:
    def __init__(
        self,
        root: Path,
        user: User,
        *,
        step_hook: Callable[[str], None] | None = None,
    ) -> None:
        if not is_safe_component(user.name):
            raise StoreError(f"user name {user.name!r} cannot be a directory name")
        self.root = Path(root)
        self.user = user
        self.layout = StoreLayout(self.root)
        # Tests inject a hook that SIGKILLs the writer at a given step.
        self._step_hook = step_hook

    # -- layout -------------------------------------------------------------

    @property
    def user_dir(self) -> Path:
        return self.layout.user_dir(self.user)

    def job_dir(self, job_id: str, create: bool = True) -> Path:
        path = self.layout.job_dir(self.user, job_id)
        if create:
            os.close(self._open_dir(path, create=True))
        return path

    def image_path(self, job_id: str, ckptid: int) -> Path:
        return self.layout.image(self.user, job_id, ckptid)

    def _open_dir(self, path: Path, *, create: bool) -> int:
        return open_private_dir(path, self.user.uid, self.user.gid, base=self.root, create=create)

    def _step(self, name: str) -> None:
        if self._step_hook is not None:
            self._step_hook(name)

    # -- publish ------------------------------------------------------------

    @contextlib.contextmanager
    def publish(
        self,
        cat: Catalog,
        *,
        job_id: str,
        engine: str,
        node: str,
        **begin_kwargs: Any,
    ) -> Iterator[Publication]:
        """Allocate a ckptid, let the caller write the image, then make it durable and commit it.

        On any exception inside the block (or while finishing) the temp or
        final file is removed, the row is marked failed, and the error re-raised.
        """
        final = self.layout.job_dir(self.user, job_id)
        dir_fd = self._open_dir(final, create=True)
        meta = dict(begin_kwargs.pop("meta", None) or {})
        meta.setdefault("writer", writer_identity())
        try:
            ckptid = cat.begin(
                job_id=job_id,
                uid=self.user.uid,
                user=self.user.name,
                node=node,
                engine=engine,
                path=str(final),  # the job dir until commit sets the image path
                meta=meta,
                **begin_kwargs,
            )
        except BaseException:
            os.close(dir_fd)
            raise
        name = image_name(ckptid)
        final_path = final / name
        tmp = temp_name(name)
        state = "begun"
        try:
            self._step("begun")
            fd = open_private_file_at(dir_fd, tmp, self.user.uid, self.user.gid)
            fh = os.fdopen(fd, "wb", buffering=1 << 20)
            state = "temp"
            pub = Publication(ckptid=ckptid, path=final_path, file=fh, temp_path=final / tmp)
            self._step("opened")
            try:
                yield pub
                self._step("written")
                fh.flush()
                os.fsync(fh.fileno())
                size = os.fstat(fh.fileno()).st_size
                self._step("fsynced")
            finally:
                fh.close()
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            state = "final"
            self._step("renamed")
            os.fsync(dir_fd)
            self._step("dir_synced")
            cat.commit(ckptid, path=str(final_path), size_bytes=size, duration=time.monotonic() - pub.started,
                       meta=pub.meta or None)
            state = "committed"
            self._step("committed")
            hlog.event(
                _log, "store.published", f"checkpoint {ckptid} of job {job_id} committed",
                ckptid=ckptid, job_id=job_id, size_bytes=size, path=str(final_path),
            )
        except BaseException as exc:
            if state != "committed":
                self._abandon(cat, dir_fd, ckptid, tmp if state == "temp" else name, state, exc)
            raise
        finally:
            os.close(dir_fd)

    def _abandon(self, cat: Catalog, dir_fd: int, ckptid: int, name: str, state: str, exc: BaseException) -> None:
        if state in ("temp", "final"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
            with contextlib.suppress(OSError):
                os.fsync(dir_fd)
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        try:
            cat.fail(ckptid, reason)
        except Exception as fail_exc:  # the original error matters more; gc will fix the row
            hlog.event(_log, "store.fail_unrecorded", f"could not mark checkpoint {ckptid} failed: {fail_exc}",
                       level=30, ckptid=ckptid)

    def publish_file(
        self,
        cat: Catalog,
        staged: Path,
        *,
        job_id: str,
        engine: str,
        node: str,
        **begin_kwargs: Any,
    ) -> CkptRecord:
        """Publish an image already written elsewhere (node-local staging, async flush)."""
        try:
            src = open(staged, "rb")  # noqa: SIM115 - closed below, after the publish
        except OSError as exc:
            raise StoreError(f"{staged}: cannot read staged image: {exc.strerror}") from exc
        with src, self.publish(cat, job_id=job_id, engine=engine, node=node, **begin_kwargs) as pub:
            shutil.copyfileobj(src, pub.file, 4 << 20)
            ckptid = pub.ckptid
        rec = cat.get(ckptid)
        if rec is None:
            raise NotFoundError(f"checkpoint {ckptid} vanished from the catalog right after commit")
        return rec

    # -- inspection and removal ----------------------------------------------

    def iter_job_dirs(self) -> Iterator[tuple[str, int]]:
        """``(dir name, open dir fd)`` for each job dir; the caller must not keep the fd."""
        try:
            user_fd = self._open_dir(self.user_dir, create=False)
        except FileNotFoundError:
            return
        try:
            for name, st in iter_dir_nofollow(user_fd):
                if not stat.S_ISDIR(st.st_mode):
                    continue
                try:
                    fd = self._open_dir(self.user_dir / name, create=False)
                except (UnsafePathError, FileNotFoundError) as exc:
                    hlog.event(_log, "store.skip_dir", f"skipping {self.user_dir / name}: {exc}", level=30)
                    continue
                try:
                    yield name, fd
                finally:
                    os.close(fd)
        finally:
            os.close(user_fd)

    def scan(self) -> list[StoreEntry]:
        """Every image and temp file in this user's store (regular files only)."""
        out: list[StoreEntry] = []
        for dname, fd in self.iter_job_dirs():
            for fname, st in iter_dir_nofollow(fd):
                if not stat.S_ISREG(st.st_mode):
                    continue
                path = self.user_dir / dname / fname
                if fname.startswith(TEMP_PREFIX):
                    out.append(StoreEntry(path, None, True, st.st_size, st.st_mtime))
                else:
                    parsed = parse_store_name(fname)
                    if parsed is not None:
                        out.append(StoreEntry(path, parsed[0], False, st.st_size, st.st_mtime, parsed[1]))
        return out

    def remove_checkpoint(self, image: Path) -> list[Path]:
        """Unlink a checkpoint's image and its companion files; returns what was removed."""
        image = Path(image)
        ckptid = parse_image_name(image.name)
        if ckptid is None:
            raise UnsafePathError(f"{image}: not a checkpoint image name")
        removed = [image] if self.remove(image) else []
        try:
            names = os.listdir(image.parent)
        except FileNotFoundError:
            return removed
        for name in names:
            parsed = parse_store_name(name)
            if parsed is not None and parsed[0] == ckptid and parsed[1] is not None:
                path = image.parent / name
                if self.remove(path):
                    removed.append(path)
        return removed

    def remove(self, path: Path) -> bool:
        """Unlink one file of this store through its directory fd; False if already gone."""
        path = Path(path)
        try:
            rel = path.relative_to(self.user_dir)
        except ValueError as exc:
            raise UnsafePathError(f"{path} is not inside {self.user_dir}; refusing to delete it") from exc
        if len(rel.parts) != 2 or not all(is_safe_component(p) for p in rel.parts):
            raise UnsafePathError(f"{path}: not a file directly inside a job dir of {self.user_dir}")
        try:
            fd = self._open_dir(path.parent, create=False)
        except FileNotFoundError:
            return False
        try:
            os.unlink(rel.parts[1], dir_fd=fd)
            os.fsync(fd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)


@dataclass(frozen=True)
class StoreEntry:
    path: Path
    ckptid: int | None  # None for temp files
    temp: bool
    size: int
    mtime: float
    companion: str | None = None  # e.g. "r3" for rank 3's shard of an app checkpoint
