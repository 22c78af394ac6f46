"""Opening an image file by name, with the error a user can act on for each way it fails."""

from __future__ import annotations

import errno
import os

from hpcckpt.errors import HpcckptError, PermissionDeniedError
from hpcckpt.image.errors import UnreadableImageError
from hpcckpt.inputs import NotRegularFileError, open_regular


def open_image_fd(
    path: str | os.PathLike[str],
    *,
    role: str = "image",
    follow_symlinks: bool = True,
    missing_hint: str = "check the path",
    denied: type[HpcckptError] = PermissionDeniedError,
) -> int:
    """A read-only descriptor of the image file ``path``; the caller closes it.

    A FIFO, directory or device is refused without being read (a FIFO would
    block forever); a file the caller may not read is a permission error
    (exit 10, or ``denied``), not "no such file"; ``follow_symlinks=False``
    is for paths from the catalog, below which nothing is ever a link.
    """
    name = os.fspath(path)
    try:
        return open_regular(name, follow_symlinks=follow_symlinks)
    except NotRegularFileError as exc:
        raise UnreadableImageError(f"{name}: is {exc.kind}; {role}s are regular files",
                                   hint="give the path of an image file (.hck) or a checkpoint id") from exc
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise UnreadableImageError(f"{name}: no such {role} file", hint=missing_hint) from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise denied(
                f"{name}: permission denied: you may not read this {role}",
                hint="images are readable only by the user who took them (and root)",
            ) from exc
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise UnreadableImageError(f"{name}: is a symbolic link; refusing to follow it",
                                       hint="hpcckpt never links images; someone planted it") from exc
        raise UnreadableImageError(f"{name}: cannot open {role}: {exc.strerror}") from exc
