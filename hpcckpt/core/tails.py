"""Cutting a job's grown files back for a restore, without ever losing the bytes cut off.

A job that ran on after its checkpoint appended to its output files; CRIU
needs each file back at the size it had at the checkpoint. Cutting them back
is the one step of a resume that changes the user's data, so it is made
undoable: before a file is cut, the bytes past the cut (its tail) are copied
into a private directory of the job's node-local staging (0700, files 0600)
and fsynced. If CRIU then fails, every tail is written back where it was and
the file's times are restored, so the file is byte-identical to before the
resume; once CRIU has succeeded, the tails are dropped.

A resume that dies between the cut and the end of CRIU leaves the tails in
place, with ``tails.json`` saying which file each belongs to and where it was
cut; the next resume of the job warns about them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hpcckpt import log as hlog
from hpcckpt.errors import IncompatibleError, StoreError

_log = hlog.get("resume")
_COPY = 1 << 20
MANIFEST = "tails.json"


@dataclass(frozen=True)
class KeptTail:
    path: str  # the user's file
    inode: int
    dev: int
    size: int  # where it was cut
    length: int  # bytes kept
    atime_ns: int
    mtime_ns: int
    copy: str  # the tail's copy in our private directory


def _copy_range(src: int, offset: int, length: int, dst: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to ``dst`` at its file position."""
    done = 0
    fast = True
    while done < length:
        want = min(_COPY, length - done)
        n = 0
        if fast:
            try:
                n = os.copy_file_range(src, dst, want, offset + done)
            except OSError:
                fast = False  # not supported for these files: plain reads and writes
        if n <= 0:
            data = os.pread(src, want, offset + done)
            if not data:
                raise OSError(f"ends at {offset + done}, expected {offset + length} bytes")
            n = os.write(dst, data)
        done += n


class Tails:
    """The files cut back for one restore attempt, with their tails kept under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kept: list[KeptTail] = []

    def cut(self, path: str, size: int, inode: int) -> None:
        """Keep ``path``'s bytes past ``size``, then cut it there; only if it is still ``inode``, never a link."""
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_ino != inode:
                raise IncompatibleError(f"{path}: was replaced while preparing the restore")
            if st.st_size <= size:
                return
            if not self.kept:
                os.mkdir(self.root, 0o700)
            copy = self.root / f"tail-{len(self.kept)}"
            out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _copy_range(fd, size, st.st_size - size, out)
                os.fsync(out)
            except OSError as exc:
                raise StoreError(f"{path}: cannot keep its last {st.st_size - size} bytes in {copy} before cutting "
                                 f"it back: {exc}; the file was not changed",
                                 hint="free space in storage.staging (node-local disk)") from exc
            finally:
                os.close(out)
            self.kept.append(KeptTail(path, st.st_ino, st.st_dev, size, st.st_size - size, st.st_atime_ns,
                                      st.st_mtime_ns, str(copy)))
            self._write_manifest()
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        hlog.event(_log, "resume.truncated", f"{path}: cut back to its checkpointed size {size}; its last "
                   f"{self.kept[-1].length} bytes are kept in {self.kept[-1].copy} until the restore succeeds",
                   path=path, size=size, kept=self.kept[-1].copy)

    def _write_manifest(self) -> None:
        """``tails.json``: which file each tail belongs to, should this process die before putting them back."""
        tmp = self.root / f"{MANIFEST}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([dataclasses.asdict(t) for t in self.kept], f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / MANIFEST)

    def put_back(self) -> None:
        """Write every kept tail back (the restore failed): each file as it was before the resume.

        Raises :class:`StoreError` naming what could not be put back; those tails stay where they are.
        """
        problems: list[str] = []
        left: list[KeptTail] = []
        for t in reversed(self.kept):
            try:
                self._put_back_one(t)
            except (OSError, StoreError) as exc:
                left.insert(0, t)
                problems.append(f"{t.path}: {exc}; its last {t.length} bytes are kept in {t.copy}")
        if problems:
            self.kept = left
            with contextlib.suppress(OSError):
                self._write_manifest()
            raise StoreError("the restore failed and some files cut back could not be put back as they were:\n  "
                             + "\n  ".join(problems),
                             hint="append each kept tail to its file (cat TAIL >> FILE) once nothing else writes it")
        self.kept = []
        self.drop()

    def _put_back_one(self, t: KeptTail) -> None:
        fd = os.open(t.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_dev) != (t.inode, t.dev) or st.st_size != t.size:
                raise StoreError(f"changed since it was cut back (size {st.st_size}, cut at {t.size})")
            src = os.open(t.copy, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.lseek(fd, t.size, os.SEEK_SET)
                _copy_range(src, 0, t.length, fd)
            finally:
                os.close(src)
            os.fsync(fd)
            os.utime(fd, ns=(t.atime_ns, t.mtime_ns))
        finally:
            os.close(fd)
        os.unlink(t.copy)
        hlog.event(_log, "resume.untruncated", f"{t.path}: put back as it was ({t.size + t.length} bytes)",
                   path=t.path, size=t.size + t.length)

    def drop(self) -> None:
        """Forget the tails (the restore succeeded, or nothing was cut)."""
        self.kept = []
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root)
