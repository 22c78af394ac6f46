"""Reading one CHUNK record back from where an earlier pass found it, checked.

Both random-access readers use this: an incremental image's references into
its parents (:mod:`hpcckpt.image.parent`) and a streamed restore's page data
(:mod:`hpcckpt.image.stream`). It reads with ``pread`` on a plain file
descriptor, so several threads may fetch from one open image at once, and
into a buffer the caller owns, so a restore that streams gigabytes does not
allocate a new chunk-sized object per chunk.

A chunk comes back only after every check a sequential read would make:
record type, length bound, record checksum (seeded with the record's index,
so a record moved elsewhere fails), the codec, and the content hash. The
caller names the content hash it expects, from a record that was itself
checked (a CHUNK_REF, or the trailer-covered header of this very record),
so the bytes are tied to the image that vouched for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import xxhash

from hpcckpt.image import format as F
from hpcckpt.image.codec import CodecError, decompress
from hpcckpt.image.errors import CorruptImageError, UnreadableImageError
from hpcckpt.image.records import record_checksum

_HEAD = F.RECORD_HEADER.size


@dataclass(frozen=True)
class ChunkAt:
    """Where a chunk of a section streamed later lies: in this image (``ref`` 0) or in parent ``ref``.

    ``digest`` comes from a checked CHUNK_REF for a parent's chunk; for a
    chunk of this image it was read unchecked with the record's fixed part
    and is trusted only once :func:`read_chunk` has checked the whole record
    against ``checksum`` (the header's, which the trailer digest covers).
    """

    offset: int  # in the section
    raw_len: int
    digest: bytes
    ref: int = 0
    rec_offset: int = 0
    rec_index: int = 0
    checksum: int = 0


class ChunkBuffer:
    """A reusable read buffer for one thread; grows to at most one record."""

    def __init__(self, size: int = 1 << 20) -> None:
        self._buf: bytearray | memoryview = bytearray(size)
        self._fixed = False

    @classmethod
    def over(cls, memory: memoryview) -> ChunkBuffer:
        """Read into memory the caller owns (and splices from); a record too big for it gets its own."""
        b = cls(0)
        b._buf, b._fixed = memory, True
        return b

    def view(self, n: int) -> memoryview:
        if len(self._buf) < n:
            if self._fixed:
                return memoryview(bytearray(n))
            self._buf = bytearray(n)
        return memoryview(self._buf)[:n]


def read_chunk(
    fd: int,
    name: str,
    rec_offset: int,
    rec_index: int,
    digest: bytes,
    raw_len: int,
    buf: ChunkBuffer | None = None,
    *,
    checksum: int | None = None,
    what: str = "chunk",
) -> bytes | memoryview:
    """The raw bytes of the CHUNK record at ``rec_offset``, or CorruptImageError naming the file and offset.

    ``checksum``, when given, is the record checksum an earlier pass read in
    the record's header (covered by the image's trailer digest): the header
    read now must carry the same one. The result may be a view into ``buf``,
    valid until the buffer's next use.
    """

    def bad(msg: str) -> CorruptImageError:
        return CorruptImageError(msg, path=name, offset=rec_offset, record=rec_index, rtype="chunk",
                                 hint="the image is damaged; resume from an older checkpoint (hpcckpt list JOBID)")

    try:
        head = os.pread(fd, _HEAD, rec_offset)
    except OSError as exc:
        raise UnreadableImageError(f"{name}: read error at offset {rec_offset}: {exc.strerror}") from exc
    if len(head) != _HEAD:
        raise bad("truncated: the file ends inside a chunk's record header")
    rtype, _flags, plen, stored_sum = F.RECORD_HEADER.unpack(head)
    if rtype != F.T_CHUNK or not F.CHUNK.size <= plen <= F.MAX_PAYLOAD:
        raise bad(f"expected a chunk record, found {F.type_name(rtype)} of {plen} bytes")
    if checksum is not None and stored_sum != checksum:
        raise bad("record header changed since the image was checked")
    payload = (buf or ChunkBuffer(plen)).view(plen)
    got = 0
    while got < plen:
        try:
            n = os.preadv(fd, [payload[got:]], rec_offset + _HEAD + got)
        except OSError as exc:
            raise UnreadableImageError(f"{name}: read error at offset {rec_offset + _HEAD + got}: "
                                       f"{exc.strerror}") from exc
        if n == 0:
            raise bad(f"truncated: the file ends inside a chunk ({got} of {plen} bytes)")
        got += n
    if record_checksum(rec_index, head[: F.RECORD_HEADER_CHECKED], [payload]) != stored_sum:
        raise bad(f"{what} checksum mismatch over {plen} payload bytes")
    _, codec, _, _, _, stored_len, stored_digest = F.CHUNK.unpack_from(payload)
    try:
        raw = decompress(codec, payload[F.CHUNK.size :], stored_len)
    except CodecError as exc:
        raise bad(str(exc)) from exc
    if stored_len != raw_len or stored_digest != digest or xxhash.xxh3_128_digest(raw) != digest:
        raise bad(f"{what} content hash mismatch")
    return raw
