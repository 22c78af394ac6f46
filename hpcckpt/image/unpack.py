"""Unpacking an image into a directory, safely, all or nothing.

Everything is written into a fresh private staging directory inside the
target, through directory file descriptors with O_NOFOLLOW and O_EXCL: even
when root unpacks into a directory a user controls, no symlink or rename by
that user can redirect a write elsewhere. Only once the whole image has
passed every check (trailer included) are the entries renamed into place, so
on failure CRIU never finds a half image to restore from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import BinaryIO

from hpcckpt import log as hlog
from hpcckpt.errors import ImageError, StoreError, UnsafePathError
from hpcckpt.image import format as F
from hpcckpt.image.model import ImageSummary, SectionInfo
from hpcckpt.image.parent import ResolveParent
from hpcckpt.image.reader import walk

_log = hlog.get("image")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_STAGING_PREFIX = ".hpcckpt-unpack-"


class _FileSink:
    """Writes sections below the staging directory's fd."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.dir_fds: dict[str, int] = {"": root_fd}
        self.fd = -1
        self.info: SectionInfo | None = None
        self.mtime_ns = 0
        self.dirs: list[tuple[str, int, int]] = []  # (name, mode, mtime_ns), applied last

    def _dir(self, rel: str) -> int:
        """fd of directory ``rel`` below the root, created 0700 if missing."""
        fd = self.dir_fds.get(rel)
        if fd is not None:
            return fd
        parent, _, base = rel.rpartition("/")
        pfd = self._dir(parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        self.dir_fds[rel] = fd
        return fd

    def begin(self, info: SectionInfo, mtime_ns: int) -> None:
        parent, _, base = info.name.rpartition("/")
        pfd = self._dir(parent)
        self.info = info
        self.mtime_ns = mtime_ns
        if info.kind == "dir":
            self._dir(info.name)
            self.dirs.append((info.name, info.mode, mtime_ns))
            return
        self.fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)

    def data(self, offset: int, raw: bytes | memoryview) -> None:
        view = memoryview(raw)
        while view.nbytes:
            n = os.write(self.fd, view)
            view = view[n:]

    def end(self) -> None:
        if self.fd >= 0:
            assert self.info is not None
            os.fchmod(self.fd, self.info.mode & F.MODE_MASK)
            os.utime(self.fd, ns=(self.mtime_ns, self.mtime_ns))
            os.close(self.fd)
            self.fd = -1

    def finish_dirs(self) -> None:
        # Deepest first, so a read-only directory is made so after its contents are in.
        for name, mode, mtime_ns in sorted(self.dirs, key=lambda d: d[0].count("/"), reverse=True):
            fd = self.dir_fds[name]
            os.fchmod(fd, (mode & F.MODE_MASK) | 0o700)
            os.utime(fd, ns=(mtime_ns, mtime_ns))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for rel, fd in self.dir_fds.items():
            if rel:
                os.close(fd)
        self.dir_fds = {"": self.root_fd}


def _remove_tree(name: str, parent_fd: int) -> None:
    """rm -r of ``name`` below ``parent_fd``, never following symlinks."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except NotADirectoryError:
        os.unlink(name, dir_fd=parent_fd)
        return
    except FileNotFoundError:
        return
    try:
        os.fchmod(fd, 0o700)
        for entry in os.listdir(fd):
            _remove_tree(entry, fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _open_dest(dest: Path) -> tuple[int, bool]:
    """(fd of the empty target directory, whether this call created it)."""
    created = False
    try:
        os.mkdir(dest, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"{dest}: cannot create the target directory: {exc.strerror}") from exc
    try:
        fd = os.open(dest, _DIR_FLAGS)
    except OSError as exc:
        raise UnsafePathError(
            f"{dest}: not a directory (or a symlink): {exc.strerror}",
            hint="unpack into a new or empty directory",
        ) from exc
    if os.listdir(fd):
        os.close(fd)
        raise StoreError(f"{dest}: target directory is not empty", hint="unpack into a new or empty directory")
    return fd, created


def unpack_image(
    src: Path | str | BinaryIO, dest: Path | str, resolve_parent: ResolveParent | None = None
) -> ImageSummary:
    """Verify every byte of the image while writing its sections below ``dest``.

    An incremental image's references are read from the images
    ``resolve_parent`` (ckptid -> path) names, each chunk checked by its record
    checksum and content hash, so ``dest`` gets the full CRIU image.

    ``dest`` must be missing or empty. On any failure nothing of the image is
    left in it (a directory this call created is removed again).
    """
    dest = Path(dest)
    dest_fd, created = _open_dest(dest)
    staging = _STAGING_PREFIX + secrets.token_hex(6)
    moved: list[str] = []
    try:
        os.mkdir(staging, 0o700, dir_fd=dest_fd)
        stage_fd = os.open(staging, _DIR_FLAGS, dir_fd=dest_fd)
        sink = _FileSink(stage_fd)
        try:
            try:
                summary = walk(src, sink, resolve_parent)
                sink.finish_dirs()
            finally:
                sink.close()
            if summary.errors:
                raise ImageError(
                    f"{summary_name(src)}: the image records a failed checkpoint: {summary.errors[0]}",
                    hint="there is nothing to restore from it; use an older checkpoint",
                )
            for entry in os.listdir(stage_fd):
                os.rename(entry, entry, src_dir_fd=stage_fd, dst_dir_fd=dest_fd)
                moved.append(entry)
        except OSError as exc:
            raise StoreError(f"{dest}: cannot unpack: {exc}") from exc
        finally:
            os.close(stage_fd)
    except BaseException:
        for entry in [staging, *moved]:
            _cleanup(dest_fd, entry)
        os.close(dest_fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(dest)
        raise
    os.rmdir(staging, dir_fd=dest_fd)
    os.close(dest_fd)
    hlog.event(_log, "image.unpacked", f"unpacked into {dest}", logging.DEBUG, ckptid=summary.meta.ckptid,
               sections=len(summary.sections), bytes=summary.length)
    return summary


def _cleanup(dest_fd: int, name: str) -> None:
    try:
        _remove_tree(name, dest_fd)
    except OSError as exc:  # the caller's error matters more; say what was left behind
        _log.warning("could not remove %s after a failed unpack: %s", name, exc)


def summary_name(src: Path | str | BinaryIO) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    name = getattr(src, "name", None)
    return name if isinstance(name, str) else "<stream>"


