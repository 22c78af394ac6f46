"""Writing an image to a file path: private, all or nothing.

The store has its own publish step; this is for images written where the
user says (``hpcckpt image pack``): a temporary name beside the target,
mode 0600, fsync, rename, so a crash or error never leaves a half image
under the final name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hpcckpt.errors import StoreError
from hpcckpt.image.model import PackStats

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_image_file(path: Path, write: Callable[[BinaryIO], PackStats], *, force: bool = False) -> PackStats:
    if os.path.lexists(path) and not force:
        raise StoreError(f"{path}: already exists", hint="choose another name, or pass --force to replace it")
    tmp = path.with_name(f".tmp-{path.name}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, _FLAGS, 0o600)
    except OSError as exc:
        raise StoreError(f"{tmp}: cannot create: {exc.strerror}") from exc
    try:
        with open(fd, "wb", buffering=1 << 20) as f:
            stats = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return stats
