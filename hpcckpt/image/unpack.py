"""Unpacking an image into a directory, safely, all or nothing.

Everything is written into a fresh private staging directory inside the
target, through directory file descriptors with O_NOFOLLOW and O_EXCL: even
when root unpacks into a directory a user controls, no symlink or rename by
that user can redirect a write elsewhere. Only once the whole image has
passed every check (trailer included) are the entries renamed into place, so
on failure CRIU never finds a half image to restore from.

Speed (a restore waits for all of this before CRIU starts): the walker
reads, checks and decompresses on the calling thread while one writer
thread copies the checked bytes into the files, so reading and hashing
overlap the copy into tmpfs. (Reading ahead on other threads was measured and
made it slower: the disk is the limit, and a second stream only competes
with the walker's.) Nothing is fsynced:
the files are a restore's scratch copy, which must be complete and checked
(the rename comes last, after the trailer) but never needs to survive a
crash of the node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from hpcckpt import log as hlog
from hpcckpt.errors import StoreError, UnsafePathError
from hpcckpt.image import format as F
from hpcckpt.image.errors import ImageError
from hpcckpt.image.fetch import ChunkAt
from hpcckpt.image.model import ImageSummary, SectionInfo
from hpcckpt.image.parent import ChunkSource
from hpcckpt.image.reader import walk, walk_deferred
from hpcckpt.image.refs import ResolveParent

_log = hlog.get("image")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_STAGING_PREFIX = ".hpcckpt-unpack-"


# Bytes handed to the writer thread and not yet written: enough to keep it busy
# while the walker reads the next few chunks, small next to any job's memory.
_WRITE_AHEAD = 64 << 20
_Op = Callable[[], None] | threading.Event


class _Writer:
    """One thread that runs write operations in order; the first error is raised on the caller's thread."""

    def __init__(self) -> None:
        # (operation, bytes it writes); None ends the thread
        self._ops: queue.SimpleQueue[tuple[_Op, int] | None] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._pending = 0  # bytes queued and not yet written
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="hpcckpt-unpack-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._ops.get()) is not None:
            op, nbytes = item
            if isinstance(op, threading.Event):
                op.set()  # a drain() marker: everything before it has run (or been dropped)
            elif self._error is None and not self._cancelled:
                try:
                    op()
                except BaseException as exc:  # handed to the caller's thread by check()
                    self._error = exc
            with self._room:
                self._pending -= nbytes
                self._room.notify_all()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, op: _Op, nbytes: int = 0) -> None:
        self.check()
        with self._room:
            self._room.wait_for(lambda: self._pending < _WRITE_AHEAD or self._error is not None)
            self._pending += nbytes
        self._ops.put((op, nbytes))

    def drain(self) -> None:
        """Wait until everything submitted is written (the queue is in order); raise the writer's error if any."""
        done = threading.Event()
        self._ops.put((done, 0))
        done.wait()
        self.check()

    def close(self) -> None:
        """Stop the thread; writes still queued (after a failed walk) are dropped."""
        self._cancelled = True
        self._ops.put(None)
        self._thread.join()


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        view = view[os.write(fd, view):]


def _finish_file(fd: int, mode: int, mtime_ns: int) -> None:
    try:
        os.fchmod(fd, mode & F.MODE_MASK)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)


# Sections handed to an on_verified callback are small metadata files; never hold more.
MAX_EARLY = 1 << 20
OnVerified = Mapping[str, Callable[[bytes], None]]


class _FileSink:
    """Writes sections below the staging directory's fd, through a writer thread."""

    def __init__(self, root_fd: int, on_verified: OnVerified | None = None,
                 defer: Callable[[SectionInfo], bool] | None = None) -> None:
        self.on_verified = on_verified or {}
        self._defer = defer
        self.deferred: dict[str, tuple[SectionInfo, list[ChunkAt]]] = {}  # name -> (section, its chunks)
        self._later: list[ChunkAt] | None = None
        self.early: bytearray | None = None  # the current section's bytes, when a callback wants them
        self.root_fd = root_fd
        self.dir_fds: dict[str, int] = {"": root_fd}
        self.fd = -1
        self.info: SectionInfo | None = None
        self.mtime_ns = 0
        self.dirs: list[tuple[str, int, int]] = []  # (name, mode, mtime_ns), applied last
        self.open_fds: set[int] = set()  # handed to the writer, closed by it (or by close())
        self.writer = _Writer()

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

    def defer(self, info: SectionInfo) -> bool:
        """Whether the section begun last is left out of the directory, to be streamed later."""
        return self._later is not None

    def later(self, chunk: ChunkAt) -> None:
        assert self._later is not None
        self._later.append(chunk)

    def begin(self, info: SectionInfo, mtime_ns: int) -> None:
        if self._defer is not None and info.kind == "file" and self._defer(info):
            self._later = []
            self.deferred[info.name] = (info, self._later)
            self.info = info
            return
        self._later = None
        parent, _, base = info.name.rpartition("/")
        pfd = self._dir(parent)
        self.info = info
        self.mtime_ns = mtime_ns
        if info.kind == "dir":
            self._dir(info.name)
            self.dirs.append((info.name, info.mode, mtime_ns))
            return
        # Opened here, not on the writer: a name clash (O_EXCL) or unsafe path fails at its own record.
        self.fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        self.open_fds.add(self.fd)
        self.early = bytearray() if info.name in self.on_verified and info.size <= MAX_EARLY else None

    def data(self, offset: int, raw: bytes | memoryview) -> None:
        view = memoryview(raw)
        if self.early is not None:
            self.early += view
        if not isinstance(view.obj, bytes):
            # The reader reuses its buffer for the next record; only immutable bytes can wait in the queue.
            view = memoryview(bytes(view))
        fd = self.fd
        self.writer.submit(lambda: _write_all(fd, view), view.nbytes)

    def end(self) -> None:
        if self.fd >= 0:
            assert self.info is not None
            fd, mode, mtime_ns = self.fd, self.info.mode, self.mtime_ns

            def finish() -> None:
                self.open_fds.discard(fd)
                _finish_file(fd, mode, mtime_ns)

            self.writer.submit(finish)
            self.fd = -1
            if self.early is not None:
                # Every chunk of this section has passed its checksum and content hash (the walker calls
                # data() only after both), though the image's trailer is still to come.
                self.on_verified[self.info.name](bytes(self.early))
                self.early = None

    def finish_dirs(self) -> None:
        self.writer.drain()  # every file complete before a directory is made read-only
        # Deepest first, so a read-only directory is made so after its contents are in.
        for name, mode, mtime_ns in sorted(self.dirs, key=lambda d: d[0].count("/"), reverse=True):
            fd = self.dir_fds[name]
            os.fchmod(fd, (mode & F.MODE_MASK) | 0o700)
            os.utime(fd, ns=(mtime_ns, mtime_ns))

    def close(self) -> None:
        self.writer.close()
        for fd in self.open_fds:  # files the writer never finished (the walk failed)
            with contextlib.suppress(OSError):
                os.close(fd)
        self.open_fds.clear()
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
    src: Path | str | BinaryIO,
    dest: Path | str,
    resolve_parent: ResolveParent | None = None,
    *,
    on_verified: OnVerified | None = None,
) -> ImageSummary:
    return _unpack(src, dest, resolve_parent, on_verified=on_verified)[0]


Deferred = dict[str, tuple[SectionInfo, list[ChunkAt]]]


def unpack_deferring(
    src: Path | str,
    dest: Path | str,
    resolve_parent: ResolveParent | None,
    defer: Callable[[SectionInfo], bool],
    *,
    on_verified: OnVerified | None = None,
) -> tuple[ImageSummary, Deferred, ChunkSource]:
    """:func:`unpack_image`, except the sections ``defer`` picks: those are checked for structure only.

    Returns the summary, each deferred section's chunk locations, and the
    image's parents, open, to fetch referenced chunks from (close them).
    The trailer digest, every small record and every other section are
    checked before this returns, and every parent referred to is open and
    checked to be the right checkpoint of the right user; each deferred
    chunk (and whether a parent holds it) is checked when fetched.
    """
    summary, deferred, refs = _unpack(src, dest, resolve_parent, on_verified=on_verified, defer=defer)
    assert refs is not None
    return summary, deferred, refs


def _unpack(
    src: Path | str | BinaryIO,
    dest: Path | str,
    resolve_parent: ResolveParent | None = None,
    *,
    on_verified: OnVerified | None = None,
    defer: Callable[[SectionInfo], bool] | None = None,
) -> tuple[ImageSummary, Deferred, ChunkSource | None]:
    """Verify every byte of the image while writing its sections below ``dest``.

    An incremental image's references are read from the images
    ``resolve_parent`` (ckptid -> path) names, each chunk checked by its record
    checksum and content hash, so ``dest`` gets the full CRIU image.

    ``dest`` must be missing or empty. On any failure nothing of the image is
    left in it (a directory this call created is removed again).

    ``on_verified`` maps section names (files of at most ``MAX_EARLY`` bytes)
    to callbacks that get the file's bytes as soon as every chunk of it has
    been checked, while the rest of the image is still being read: a restore
    starts ``criu cpuinfo check`` on cpuinfo.img early this way. The image as
    a whole is only vouched for when this returns, so a callback may start
    work but must not act on the image before then.
    """
    dest = Path(dest)
    dest_fd, created = _open_dest(dest)
    staging = _STAGING_PREFIX + secrets.token_hex(6)
    moved: list[str] = []
    try:
        os.mkdir(staging, 0o700, dir_fd=dest_fd)
        stage_fd = os.open(staging, _DIR_FLAGS, dir_fd=dest_fd)
        sink = _FileSink(stage_fd, on_verified, defer)
        refs: ChunkSource | None = None
        try:
            try:
                if defer is None:
                    summary = walk(src, sink, resolve_parent)
                else:
                    if not isinstance(src, (str, os.PathLike)):
                        raise TypeError("a deferring unpack reads the image by path")
                    summary, refs = walk_deferred(src, sink, resolve_parent)
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
        except BaseException as exc:
            if refs is not None:
                refs.close()
            if isinstance(exc, OSError):
                raise StoreError(f"{dest}: cannot unpack: {exc}") from exc
            raise
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
               sections=len(summary.sections), bytes=summary.length, deferred=len(sink.deferred))
    return summary, sink.deferred, refs


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


