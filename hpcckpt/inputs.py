"""Checking what a user hands the CLI before anything acts on it: checkpoint ids and input files.

Every command that takes a checkpoint id, and every reader of a file a user
names, goes through here, so that a huge number, a FIFO or a directory gets
the same clear error everywhere instead of an OverflowError or a hang.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import re
import stat

from hpcckpt.errors import UsageError

# Checkpoint ids are SQLite INTEGER PRIMARY KEYs and PostgreSQL BIGINTs: positive, and signed 64-bit.
CKPTID_MIN = 1
CKPTID_MAX = (1 << 63) - 1

# ASCII digits only: str.isdigit() also accepts '²' or '٣', which int() then refuses or reads differently.
_DIGITS = re.compile(r"[0-9]+")
# Longer than any int64, yet short enough that int() never does quadratic work on a megabyte of digits.
_MAX_DIGITS = 40


def looks_like_ckptid(text: str) -> bool:
    """Whether ``text`` is written as a checkpoint id (ASCII digits), whatever its value."""
    return _DIGITS.fullmatch(text) is not None


def parse_ckptid(text: str | int, *, what: str = "checkpoint id") -> int:
    """``text`` as a checkpoint id, or a UsageError that says the valid range."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and looks_like_ckptid(text.strip()):
        digits = text.strip()
        value = int(digits) if len(digits) <= _MAX_DIGITS else CKPTID_MAX + 1
    else:
        raise UsageError(f"{what} must be a whole number from {CKPTID_MIN} to {CKPTID_MAX}, got {_show(text)}",
                         hint="see 'hpcckpt list' for the ids of your checkpoints")
    if not CKPTID_MIN <= value <= CKPTID_MAX:
        raise UsageError(f"{what} {_show(text)} is out of range: ids run from {CKPTID_MIN} to {CKPTID_MAX}",
                         hint="see 'hpcckpt list' for the ids of your checkpoints")
    return value


def ckptid_arg(text: str) -> int:
    """argparse ``type=`` for a checkpoint id: a bad one is a usage error (exit 2) naming the range."""
    try:
        return parse_ckptid(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(err.message) from err


# Longest wait or deadline a flag may ask for: 115 days, far past any batch job, well inside what
# socket timeouts and monotonic arithmetic accept.
MAX_SECONDS = 10_000_000.0


def seconds_arg(text: str) -> float:
    """argparse ``type=`` for a timeout or deadline in seconds: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {_show(text)}") from None
    if not 0 < value <= MAX_SECONDS:  # also false for NaN
        raise argparse.ArgumentTypeError(f"seconds must be above 0 and at most {MAX_SECONDS:.0f}, got {_show(text)}")
    return value


def _show(text: object) -> str:
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:40] + f"...' ({len(str(text))} characters)"


class NotRegularFileError(Exception):
    """The path names something other than a regular file; ``kind`` says what (for messages)."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path}: is {kind}, not a regular file")
        self.path = path
        self.kind = kind


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO', ... for messages about a file that should have been regular."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> int:
    """A read-only descriptor of the regular file ``path``; the caller closes it.

    Anything but a regular file is refused before it is opened. The file is
    then opened with O_NONBLOCK, on which opening a FIFO never waits, in case
    it was swapped in after the stat, and checked again with fstat on the
    descriptor itself, which no swap can change. Either check refuses with
    :class:`NotRegularFileError`. O_NONBLOCK is cleared again
    before returning, though regular files ignore it. OSError (ENOENT, EACCES,
    ELOOP for a link when ``follow_symlinks`` is false) propagates for the
    caller to word.
    """
    # A stat first, so that a device (whose open alone may act, as a tape's rewinds) is not even opened.
    st = os.stat(path, follow_symlinks=follow_symlinks)
    if stat.S_ISLNK(st.st_mode):  # only when not following: the same error O_NOFOLLOW gives
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(path))
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(os.fspath(path), file_kind(st.st_mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(os.fspath(path), file_kind(st.st_mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    except BaseException:
        os.close(fd)
        raise
