"""The one root-safe recursive removal: by directory descriptors, never following a symlink.

Hooks run as root in directories users control; a user who swaps a
directory for a symlink between our look and our unlink must not make root
delete anything outside that directory. Every step is relative to a
directory fd opened with ``O_NOFOLLOW``, so a swapped-in symlink is unlinked
as the entry it is, never followed.
"""

from __future__ import annotations

import contextlib
import os
import stat

from hpcckpt.fs.safe import iter_dir_nofollow

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree_at(parent_fd: int, name: str) -> None:
    """rm -r ``name`` below ``parent_fd`` (a file or symlink there is unlinked); gone already is fine."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError:  # a file or a symlink (ELOOP, ENOTDIR): unlink it, never follow it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent_fd)
        return
    try:
        for child, st in list(iter_dir_nofollow(fd)):
            if stat.S_ISDIR(st.st_mode):
                remove_tree_at(fd, child)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=parent_fd)
