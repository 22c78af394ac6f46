"""Moving checked chunks into CRIU's pipe without copying them: vmsplice(2), and knowing when CRIU read them.

``os.write`` into a pipe copies every byte once more before CRIU copies it
out again into the restored memory. vmsplice(2) instead hands the pipe
references to our pages, so the only copy is CRIU's read: measured here,
1 GiB through a pipe into fresh memory at 1.36 GiB/s with write(2) and 1.85
GiB/s with vmsplice(2). The price is a rule: the spliced bytes must not
change until the reader has consumed them, so a buffer is refilled only
once :func:`wait_consumed` says CRIU read past what was spliced from it (pages
stay alive in the pipe by reference even if the buffer is unmapped, so
freeing is always safe; only writing is not).

Python has no vmsplice; it is called through ctypes on the C library, and
:data:`AVAILABLE` is False where it cannot be found (the caller then writes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import select
import struct
import termios
import time

_FIONREAD_SIZE = struct.Struct("i")


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _load() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.vmsplice
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    return fn


_vmsplice = _load()
AVAILABLE = _vmsplice is not None


def vmsplice_all(fd: int, view: memoryview) -> int:
    """Splice all of ``view`` (a writable buffer) into pipe ``fd``; BrokenPipeError if the reader left."""
    assert _vmsplice is not None
    n = view.nbytes
    if n == 0:
        return 0
    pinned = (ctypes.c_char * n).from_buffer(view)  # the address; released before returning
    try:
        base = ctypes.addressof(pinned)
        done = 0
        while done < n:
            iov = _IoVec(base + done, n - done)
            got = _vmsplice(fd, ctypes.byref(iov), 1, 0)  # ctypes lets other threads run meanwhile
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                if err == errno.EPIPE:
                    raise BrokenPipeError(err, os.strerror(err))
                raise OSError(err, f"vmsplice: {os.strerror(err)}")
            done += got
    finally:
        del pinned
    return n


def unread(fd: int) -> int:
    """Bytes in the pipe not yet read (FIONREAD works on either end of a pipe)."""
    buf = bytearray(_FIONREAD_SIZE.size)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    value: int = _FIONREAD_SIZE.unpack(buf)[0]
    return value


def wait_consumed(fd: int, written: int, upto: int, poll_s: float = 0.0001) -> None:
    """Return once the reader has consumed the pipe's stream up to position ``upto``.

    ``written`` is how many bytes went into the pipe in all. Raises
    BrokenPipeError if the reader closed its end first (the bytes left in
    the pipe then are never read, and never reach anyone).
    """
    watch = select.poll()
    watch.register(fd, select.POLLERR)
    while written - unread(fd) < upto:
        if watch.poll(0):
            raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe")
        time.sleep(poll_s)
