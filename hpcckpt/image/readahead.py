"""Ask the kernel for an image's record headers before the checking walk needs them.

A streamed or lazy restore checks every record header of the image before
CRIU starts (the trailer digest covers them all), but reads no chunk data:
the walk reads one header, seeks over 4 MiB, reads the next. From a cold
cache each of those reads is a disk round trip of its own, one after the
other, because where a header lies is known only from the one before it:
at 4 GiB (1024 chunks) that chain was 0.1-0.35 s, the one part of the time
to the job's next progress that grew with the image.

:class:`HeaderReadahead` breaks the chain with a guess. On a thread of its
own it scans the headers ahead of the walk, and where a section's chunks
are stored raw (no codec: every chunk record has the same length but the
last), it computes where all the section's chunk headers and its end lie
and asks the kernel for all of those pages at once (``POSIX_FADV_WILLNEED``,
asynchronous), so the disk serves them with its whole queue depth, and
jumps on to the section's end. It reads nothing it trusts: every byte is
still read and checked by the walk (:mod:`hpcckpt.image.reader`); a wrong
guess (a damaged or compressed image) costs only a few wasted page reads,
and the scan then stops.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from hpcckpt.image import format as F

_HEAD = F.RECORD_HEADER.size
# A section begin's fixed part and a chunk's fixed part: what the walk reads of a record besides its header.
_PEEK = _HEAD + max(F.SECTION_BEGIN.size, F.CHUNK.size)
# The most pages asked for at once: a bound on the hints a strange image can cause (16 GiB of 4 MiB chunks).
MAX_HINTS = 4096


class HeaderReadahead:
    """Readahead hints for the record headers of the image at ``path``, on a daemon thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hinted = 0  # record headers asked for ahead of the walk
        self.guessed: list[int] = []  # where the scan guessed a section's end record lies
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpcckpt-header-readahead", daemon=True)

    def start(self) -> HeaderReadahead:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        with contextlib.suppress(OSError, ValueError):
            self._scan(fd, os.fstat(fd).st_size)
        os.close(fd)

    def _scan(self, fd: int, size: int) -> None:
        at = F.PREAMBLE.size
        section_size = 0
        while not self._stop.is_set() and at + _HEAD <= size and self.hinted < MAX_HINTS:
            peek = os.pread(fd, _PEEK, at)
            if len(peek) < _HEAD:
                return
            rtype, _flags, plen, _sum = F.RECORD_HEADER.unpack_from(peek)
            if rtype == F.T_TRAILER or plen > F.MAX_PAYLOAD:
                return
            nxt = at + _HEAD + plen
            if rtype == F.T_SECTION_BEGIN and len(peek) >= _HEAD + F.SECTION_BEGIN.size:
                section_size = F.SECTION_BEGIN.unpack_from(peek, _HEAD)[5]
            elif rtype == F.T_CHUNK and len(peek) >= _HEAD + F.CHUNK.size:
                _num, codec, _r1, _r2, offset, raw_len, _digest = F.CHUNK.unpack_from(peek, _HEAD)
                left = section_size - offset - raw_len
                if codec == F.C_NONE and plen == F.CHUNK.size + raw_len and raw_len > 0 and left > raw_len:
                    nxt = self._hint_section(fd, nxt, _HEAD + plen, raw_len, left)
            at = nxt

    def _hint_section(self, fd: int, at: int, stride: int, raw_len: int, left: int) -> int:
        """Hint the headers of the rest of a raw section (``left`` bytes in chunks of ``raw_len``, the
        first record at ``at``); where its end record should lie."""
        full, last = divmod(left, raw_len)
        n = min(full + (1 if last else 0), MAX_HINTS - self.hinted)
        for k in range(n):
            if self._stop.is_set():
                break
            os.posix_fadvise(fd, at + k * stride, _PEEK, os.POSIX_FADV_WILLNEED)
        self.hinted += n
        end = at + full * stride + ((_HEAD + F.CHUNK.size + last) if last else 0)
        self.guessed.append(end)
        os.posix_fadvise(fd, end, _PEEK, os.POSIX_FADV_WILLNEED)
        return end
