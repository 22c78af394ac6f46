"""A streamed restore's view of an image: small files unpacked and checked, page data served on demand.

A restore that first unpacks the whole image waits for every byte to be
read, checked and written to node-local staging before CRIU starts, and
then CRIU reads it all again; the node also needs room for a second copy of
the job's memory. Here the image is checked in two steps instead:

1. :func:`prepare_image` walks the whole image before CRIU starts: the
   preamble, every record header (the trailer digest covers them all, and
   each header carries its payload's checksum), every small record, and
   every section except the bulk ones, which it writes to ``dest`` for the
   restore's own checks (owner, ids, CPU, open files). Of a bulk section it
   keeps only where each chunk lies; each parent an incremental image
   refers to is opened and must be this user's checkpoint of that id, and
   its chunk index is built in the background while the restore goes on.
2. :meth:`PreparedImage.open` then hands CRIU a bulk section as a stream of
   chunks, each read back and checked (record checksum against the header
   the trailer covered, codec, content hash; a parent's chunk by the content
   hash the child's checked reference names) before its first byte is
   passed on. A chunk that fails stops the stream: CRIU sees its pipe end,
   fails the restore before any restored task runs, and the caller reports
   the image error and falls back to an older checkpoint.

So CRIU still never receives a byte that was not checked, while reading the
store overlaps CRIU's restore instead of preceding it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from hpcckpt.image import format as F
from hpcckpt.image.errors import CorruptImageError, UnreadableImageError
from hpcckpt.image.fetch import ChunkAt, ChunkBuffer, read_chunk
from hpcckpt.image.model import ImageSummary, SectionInfo
from hpcckpt.image.parent import ChunkSource
from hpcckpt.image.readahead import HeaderReadahead
from hpcckpt.image.refs import ResolveParent
from hpcckpt.image.unpack import OnVerified, unpack_deferring

# CRIU's memory contents: by far the bulk of an image, read once, in order, by restore.
PAGE_FILES = ("pages-*.img",)
# Any other file this large is streamed too (a ghost file, a tmpfs archive); the restore's own
# checks read only small metadata files.
BULK_FILE = 16 << 20
_SMALL_READ = 1 << 20
# A raw chunk's data follows the CHUNK fixed part in its record: read records this far into a
# page-aligned buffer and the data itself starts on a page, so a spliced MiB takes 256 pipe slots.
_PAD = -F.CHUNK.size % 4096


def is_bulk(info: SectionInfo) -> bool:
    """Whether a section is streamed rather than unpacked."""
    base = info.name.rpartition("/")[2]
    return info.size >= BULK_FILE or any(fnmatch.fnmatchcase(base, pat) for pat in PAGE_FILES)


class PreparedImage:
    """An image checked but for its bulk sections' chunk data; serves every file by name."""

    def __init__(self, path: Path, dest: Path, summary: ImageSummary,
                 deferred: Mapping[str, tuple[SectionInfo, list[ChunkAt]]], parents: ChunkSource) -> None:
        self.path = path
        self.dest = dest
        self.summary = summary
        self.deferred = dict(deferred)
        self._parents = parents
        self._names = {s.name for s in summary.sections if s.kind == "file"}
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    @property
    def streamed_bytes(self) -> int:
        return sum(info.size for info, _ in self.deferred.values())

    def open(self, name: str) -> Iterator[memoryview] | SectionReader | None:
        """The checked content of file ``name`` of the image, or None if the image has no such file.

        A bulk section comes as a :class:`SectionReader` (chunks read into the
        caller's buffers, or iterated), any other file as an iterator.
        """
        if name not in self._names:
            return None
        if name in self.deferred:
            return SectionReader(self, name)
        return self._small(name)

    def _small(self, name: str) -> Iterator[memoryview]:
        # Checked whole by prepare_image and written by us into our private directory.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dest_fd)
        try:
            while data := os.read(fd, _SMALL_READ):
                yield memoryview(data)
        finally:
            os.close(fd)

    def _fetch(self, name: str, c: ChunkAt, buf: ChunkBuffer, done: int) -> memoryview:
        where = os.fspath(self.path)
        if c.ref:
            raw = self._parents.fetch(c.ref, c.digest, c.raw_len, buf)
        else:
            raw = read_chunk(self._fd, where, c.rec_offset, c.rec_index, c.digest, c.raw_len, buf,
                             checksum=c.checksum)
        view = memoryview(raw)
        if c.offset != done or view.nbytes != c.raw_len:  # prepare_image placed every chunk
            raise CorruptImageError(f"section {name!r}: chunk at {c.offset} out of place", path=where,
                                    offset=c.rec_offset)
        return view

    def close(self) -> None:
        self._parents.close()
        for fd in (self._fd, self._dest_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._dest_fd = -1


class SectionReader:
    """One bulk section, chunk by chunk, each checked before it is returned.

    :meth:`read_into` reads the next chunk into memory the caller owns (for
    raw chunks the result is a view of that memory, which the image
    streamer can splice into CRIU's pipe without a copy; a compressed chunk
    decodes elsewhere). Iterating yields the same views from a buffer of
    its own, each valid until the next.
    """

    def __init__(self, image: PreparedImage, name: str) -> None:
        self._image = image
        self.name = name
        self._info, self._chunks = image.deferred[name]
        self._next = 0
        self._done = 0
        # A raw chunk's record payload: the fixed part and the data (compressed data is stored only
        # when smaller than the raw).
        self.buffer_size = _PAD + F.CHUNK.size + max((c.raw_len for c in self._chunks), default=0)

    def read_into(self, memory: memoryview) -> memoryview | None:
        """The next chunk, checked (a view of ``memory`` or of a decoded copy); None after the last."""
        i = self._next
        if i == len(self._chunks):
            if self._done != self._info.size:
                raise CorruptImageError(f"section {self.name!r} streamed {self._done} of {self._info.size} bytes",
                                        path=os.fspath(self._image.path))
            return None
        view = self._image._fetch(self.name, self._chunks[i], ChunkBuffer.over(memory[_PAD:]), self._done)
        self._next += 1
        self._done += view.nbytes
        return view

    def __iter__(self) -> Iterator[memoryview]:
        memory = memoryview(bytearray(self.buffer_size))
        while (view := self.read_into(memory)) is not None:
            yield view

    def close(self) -> None:
        pass


def prepare_image(
    path: Path,
    dest: Path,
    resolve_parent: ResolveParent | None,
    *,
    on_verified: OnVerified | None = None,
    bulk: Callable[[SectionInfo], bool] = is_bulk,
) -> PreparedImage:
    """Check ``path`` (see the module docstring) and unpack all but its bulk sections into ``dest``."""
    # The walk reads every record header, one disk round trip after another from a cold cache: have the
    # kernel fetch them all at once ahead of it (hints only; the walk still reads and checks each).
    ahead = HeaderReadahead(path).start()
    try:
        summary, deferred, parents = unpack_deferring(path, dest, resolve_parent, bulk, on_verified=on_verified)
    finally:
        ahead.stop()
    try:
        return PreparedImage(path, dest, summary, deferred, parents)
    except OSError as exc:
        parents.close()
        raise UnreadableImageError(f"{path}: cannot open it again to stream it: {exc.strerror}") from exc
