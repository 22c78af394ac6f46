"""A lazy restore's view of an image: page data read at random, each chunk checked before use.

A streamed restore (:mod:`hpcckpt.image.stream`) hands CRIU each bulk
section once, in order. A lazy restore needs the same checked chunks, but
in the order the restored job touches its memory, while a background
prefetch walks the image in order. :class:`LazyPages` gives both, over a
:class:`~hpcckpt.image.stream.PreparedImage` (whole image checked but for
its bulk chunk data):

* :meth:`LazyPages.read` returns bytes of a bulk section at any offset;
  the chunk holding them is read and checked (record checksum against the
  trailer-covered header, codec, content hash; a parent's chunk by the
  hash the child's checked reference names) the first time, and kept until
  all of it has been handed out;
* :meth:`LazyPages.start_prefetch` reads and checks the chunks in image
  order on a thread of its own, a bounded window ahead of what has been
  handed out, so the daemon's background requests find them ready;
* :meth:`LazyPages.materialize` writes, into the restore's directory, the
  parts CRIU's restore itself reads: every byte of a bulk section except
  the ranges the caller names (the pages restored lazily), which stay
  holes of a sparse file.

Any failure (a chunk that fails its checks, a store that cannot be read)
is raised to the caller that asked and recorded in :attr:`LazyPages.error`;
``on_failure`` is told at once, so the restored job is killed before any
of its pages can be missing.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from hpcckpt import log as hlog
from hpcckpt.image import format as F
from hpcckpt.image.errors import CorruptImageError, UnreadableImageError
from hpcckpt.image.fetch import ChunkAt, ChunkBuffer
from hpcckpt.image.stream import PreparedImage

_log = hlog.get("image.lazy")

HOT_LIMIT = 8  # chunks read (and kept) first, out of order: where the job's small mappings lie (warm())
# Chunks kept ahead of what the daemon was given, and the most kept at all (4 MiB chunks by default).
PREFETCH_WINDOW = 32
CACHE_LIMIT = 48 + HOT_LIMIT
READ_AHEAD = 4  # chunks the kernel is asked to read ahead of the prefetch
DEMAND_WAIT = 0.05  # the most the prefetch waits for the page server's reads before its own


class _Section:
    def __init__(self, name: str, chunks: Sequence[ChunkAt], size: int, first: int) -> None:
        self.name = name
        self.chunks = list(chunks)
        self.starts = [c.offset for c in self.chunks]
        self.size = size
        self.first = first  # global index of its first chunk, in image order


class LazyPages:
    """Random access to a prepared image's bulk sections, every chunk checked before it is used."""

    def __init__(self, prepared: PreparedImage, on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.prepared = prepared
        self.on_failure = on_failure
        self.sections: dict[str, _Section] = {}
        order: list[tuple[str, int]] = []
        for name, (info, chunks) in prepared.deferred.items():
            self.sections[name] = _Section(name, chunks, info.size, len(order))
            order += [(name, i) for i in range(len(chunks))]
        self._order = order
        self._cache: OrderedDict[int, memoryview] = OrderedDict()  # global chunk index -> raw bytes
        self._given = [0] * len(order)  # bytes of each chunk handed out
        self._done = [False] * len(order)  # handed out whole: never needed again
        self._frontier = 0  # lowest chunk not yet handed out whole
        self._cond = threading.Condition()
        self._demand = 0  # reads asked for by the page server in progress
        self._stop = False
        self.error: BaseException | None = None
        self.prefetched = 0  # chunks read and checked by the prefetch
        self._hot: list[int] = []  # chunks the restored job is likely to touch first (warm())
        self._thread: threading.Thread | None = None

    @property
    def chunks(self) -> int:
        return len(self._order)

    # -- reading -----------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        first = False
        with self._cond:
            if self.error is None:
                self.error, first = exc, True
            self._cond.notify_all()
        if first and self.on_failure is not None:
            self.on_failure(exc)

    def _load(self, g: int) -> memoryview:
        """Chunk ``g`` (global index), checked; from the cache, or read now."""
        with self._cond:
            if self.error is not None:
                raise self.error
            view = self._cache.get(g)
            if view is not None:
                self._cache.move_to_end(g)
                return view
        name, i = self._order[g]
        c = self.sections[name].chunks[i]
        try:
            # A buffer of its own per chunk: the view handed out stays valid while it is cached.
            raw = self.prepared._fetch(name, c, ChunkBuffer(_record_size(c)), c.offset)
        except BaseException as exc:
            self._fail(exc)
            raise
        view = memoryview(raw)
        with self._cond:
            self._cache[g] = view
            while len(self._cache) > CACHE_LIMIT:
                self._cache.popitem(last=False)
            self._cond.notify_all()
        return view

    def read(self, name: str, offset: int, length: int) -> list[memoryview]:
        """``length`` bytes of section ``name`` from ``offset``, as views of checked chunks."""
        sec = self.sections.get(name)
        if sec is None or offset < 0 or offset + length > sec.size:
            raise CorruptImageError(f"the CRIU images ask for bytes {offset}..{offset + length} of {name!r}, "
                                    "which the image does not hold", path=os.fspath(self.prepared.path))
        out: list[memoryview] = []
        while length > 0:
            i = bisect.bisect_right(sec.starts, offset) - 1
            c = sec.chunks[i]
            g = sec.first + i
            with self._cond:
                self._demand += 1
            try:
                view = self._load(g)
            finally:
                with self._cond:
                    self._demand -= 1
                    self._cond.notify_all()
            lo = offset - c.offset
            part = view[lo : lo + min(length, c.raw_len - lo)]
            out.append(part)
            offset += part.nbytes
            length -= part.nbytes
            self._handed(g, part.nbytes, c.raw_len)
        return out

    def _handed(self, g: int, n: int, size: int) -> None:
        with self._cond:
            self._given[g] += n
            if self._given[g] >= size and not self._done[g]:
                self._done[g] = True
                self._cache.pop(g, None)
                while self._frontier < len(self._done) and self._done[self._frontier]:
                    self._frontier += 1
                self._cond.notify_all()

    # -- prefetch ----------------------------------------------------------------

    def warm(self, chunks: Iterable[int]) -> list[int]:
        """Ask the kernel to read the first ``HOT_LIMIT`` of these chunks now, without waiting; the prefetch
        then checks them first (:meth:`start_prefetch`), in image order. Returns the ones asked for."""
        hot = sorted(list(dict.fromkeys(chunks))[:HOT_LIMIT])
        for g in hot:
            self._read_ahead(g)
        self._hot = hot
        return hot

    def start_prefetch(self, skip: Iterable[int] = ()) -> None:
        """Read and check every chunk in image order, a window ahead; ``skip``: chunks never needed.

        The chunks :meth:`warm` named come first, wherever they lie."""
        for g in skip:
            self._done[g] = True
        with self._cond:
            while self._frontier < len(self._done) and self._done[self._frontier]:
                self._frontier += 1
        self._thread = threading.Thread(target=self._prefetch, name="hpcckpt-prefetch", daemon=True)
        self._thread.start()

    def _prefetch(self) -> None:
        try:
            for g in self._hot:
                with self._cond:
                    if self._stop or self.error is not None:
                        return
                    skip = self._done[g] or g in self._cache
                if not skip:
                    self._load(g)
                    self.prefetched += 1
        except BaseException:  # recorded by _load through _fail
            return
        g = 0
        try:
            while True:
                with self._cond:
                    while not self._stop and self.error is None and g >= self._frontier + PREFETCH_WINDOW:
                        self._cond.wait(0.5)
                    if self._stop or self.error is not None:
                        return
                    g = max(g, self._frontier)
                    if g >= len(self._order):
                        return
                    skip = self._done[g] or g in self._cache
                if not skip:
                    with self._cond:  # a page the job waits for first: the store serves one read at a time
                        self._cond.wait_for(lambda: self._demand == 0 or self._stop, DEMAND_WAIT)
                    self._read_ahead(g + READ_AHEAD)
                    self._load(g)
                    self.prefetched += 1
                g += 1
        except BaseException:  # recorded by _load through _fail
            return

    def _read_ahead(self, g: int) -> None:
        """Ask the kernel to start reading chunk ``g`` of this image now, while earlier ones are checked
        and served (a cold store otherwise idles while we hash)."""
        if g >= len(self._order):
            return
        name, i = self._order[g]
        c = self.sections[name].chunks[i]
        if c.ref == 0:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.prepared._fd, c.rec_offset, _record_size(c) + F.RECORD_HEADER.size,
                                 os.POSIX_FADV_WILLNEED)

    def chunk_index(self, name: str, offset: int) -> int:
        sec = self.sections[name]
        return sec.first + bisect.bisect_right(sec.starts, offset) - 1

    def chunk_end(self, g: int) -> int:
        """Where chunk ``g`` (global index) ends in its section."""
        name, i = self._order[g]
        c = self.sections[name].chunks[i]
        return c.offset + c.raw_len

    def chunks_within(self, name: str, lo: int, hi: int) -> list[int]:
        """Global indexes of the chunks of ``name`` lying wholly inside bytes ``lo..hi``."""
        sec = self.sections[name]
        return [sec.first + i for i, c in enumerate(sec.chunks) if c.offset >= lo and c.offset + c.raw_len <= hi]

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cache.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)

    # -- what CRIU's restore reads itself -----------------------------------------

    def materialize(self, lazy: dict[str, list[tuple[int, int]]]) -> int:
        """Write each bulk section into the restore's directory but its ``lazy`` (offset, length) ranges.

        The file gets its full size; the lazy ranges stay holes (no disk or
        tmpfs pages), since CRIU's restore seeks over them. Returns the bytes
        written. The chunks written here are handed out and never cached.
        """
        written = 0
        for name, sec in self.sections.items():
            ranges = sorted(lazy.get(name, []))
            eager = _complement(ranges, sec.size)
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=self.prepared._dest_fd)
            except OSError as exc:
                raise UnreadableImageError(f"{self.prepared.dest}/{name}: cannot create: {exc.strerror}") from exc
            try:
                os.ftruncate(fd, sec.size)
                for lo, n in eager:
                    for view in self.read(name, lo, n):
                        done = 0
                        while done < view.nbytes:
                            done += os.pwrite(fd, view[done:], lo + done)
                        lo += view.nbytes
                        written += view.nbytes
            finally:
                os.close(fd)
        return written


def _record_size(c: ChunkAt) -> int:
    return F.CHUNK.size + c.raw_len


def _complement(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of ``0..size`` not covered by sorted ``ranges``."""
    out: list[tuple[int, int]] = []
    at = 0
    for lo, n in ranges:
        if lo > at:
            out.append((at, lo - at))
        at = max(at, lo + n)
    if at < size:
        out.append((at, size - at))
    return out


def close_quietly(pages: LazyPages | None) -> None:
    if pages is not None:
        with contextlib.suppress(Exception):
            pages.close()
