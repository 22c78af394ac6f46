"""A read-only FUSE view of a directory whose reads of a chosen byte range fail with EIO.

    python failfs.py BACKING MOUNTPOINT CONTROL

CONTROL holds ``NAME LO HI`` (or nothing): reads of bytes LO..HI of file
NAME then fail as a disk or network store that stopped answering fails
them. It is re-read on every read, so a test arms it at any moment. The
mount uses direct I/O, so nothing the kernel cached hides the failure.
Runs in the foreground until unmounted (``fusermount -u MOUNTPOINT``).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from fuse import FUSE, FuseOSError, Operations


class FailFS(Operations):
    def __init__(self, root: str, control: str) -> None:
        self.root = root
        self.control = control

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._path(path))
        return {k: getattr(st, k) for k in ("st_mode", "st_uid", "st_gid", "st_size", "st_nlink", "st_atime",
                                             "st_mtime", "st_ctime", "st_ino")}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseOSError(errno.EROFS)
        return os.open(self._path(path), os.O_RDONLY)

    def _failing(self, path: str, lo: int, hi: int) -> bool:
        try:
            with open(self.control) as f:
                parts = f.read().split()
        except OSError:
            return False
        return len(parts) == 3 and parts[0] == path.lstrip("/") and lo < int(parts[2]) and hi > int(parts[1])

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if self._failing(path, offset, offset + size):
            raise FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._path(path))
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                             "f_files", "f_flag", "f_frsize", "f_namemax")}


def main() -> None:
    backing, mount, control = sys.argv[1:4]
    FUSE(FailFS(backing, control), mount, foreground=True, ro=True, direct_io=True, nothreads=False)


if __name__ == "__main__":
    main()
