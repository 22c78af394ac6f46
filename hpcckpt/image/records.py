"""The record layer: preamble, checksummed records, trailer, in one sequential pass.

Both sides only ever move forward through the stream, so images can be
written to and read from pipes. The reader checks each length against its
bound before it reads (or allocates) anything, and hands out only records
whose checksum, flags and type it has accepted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import xxhash

from hpcckpt.errors import StoreError
from hpcckpt.image import format as F
from hpcckpt.image.errors import CorruptImageError, UnreadableImageError, UnsupportedImageError

Buffer = bytes | bytearray | memoryview

# Small records are gathered and written together; big payloads go straight
# through, so chunk data is never copied into an intermediate buffer.
_GATHER_LIMIT = 1 << 20


def preamble_bytes() -> bytes:
    head = F.PREAMBLE.pack(F.HEAD_MAGIC, F.VERSION_MAJOR, F.VERSION_MINOR, 0)[:12]
    return head + (xxhash.xxh3_64_intdigest(head) & 0xFFFFFFFF).to_bytes(4, "little")


def record_checksum(index: int, head8: Buffer, parts: Sequence[Buffer]) -> int:
    h = xxhash.xxh3_64(head8, seed=index)
    for p in parts:
        h.update(p)
    return h.intdigest()


class RecordWriter:
    """Writes the preamble on creation, then records, then :meth:`finish` the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._gather = bytearray()
        self.index = 0
        self.offset = 0
        self._digest = xxhash.xxh3_128()
        pre = preamble_bytes()
        self._digest.update(pre)
        self._emit([pre])

    def _emit(self, parts: Sequence[Buffer]) -> None:
        size = sum(memoryview(p).nbytes for p in parts)
        self.offset += size
        if size + len(self._gather) <= _GATHER_LIMIT:
            for p in parts:
                self._gather += p
            return
        self.flush()
        try:
            for p in parts:
                self._out.write(p)
        except OSError as exc:
            raise StoreError(f"cannot write image: {exc}", hint="check the filesystem's free space") from exc

    def flush(self) -> None:
        if self._gather:
            try:
                self._out.write(self._gather)
            except OSError as exc:
                raise StoreError(
                    f"cannot write image: {exc}", hint="check the filesystem's free space"
                ) from exc
            self._gather = bytearray()

    def write(self, rtype: int, parts: Sequence[Buffer], flags: int = 0) -> None:
        length = sum(memoryview(p).nbytes for p in parts)
        if length > F.MAX_PAYLOAD:
            # a writer bug, never user input: the reader would refuse this image
            raise ValueError(f"{F.type_name(rtype)} record of {length} bytes exceeds {F.MAX_PAYLOAD}")
        head8 = F.RECORD_HEADER.pack(rtype, flags, length, 0)[: F.RECORD_HEADER_CHECKED]
        header = F.RECORD_HEADER.pack(rtype, flags, length, record_checksum(self.index, head8, parts))
        self._digest.update(header)
        self._emit([header, *parts])
        self.index += 1

    def finish(self) -> tuple[int, int, str]:
        """Write the trailer; returns (records, total length, digest hex)."""
        records = self.index + 1
        total = self.offset + F.RECORD_HEADER.size + F.TRAILER.size
        digest = self._digest.digest()
        self.write(F.T_TRAILER, [F.TRAILER.pack(F.TAIL_MAGIC, records, total, digest)])
        self.flush()
        return records, total, digest.hex()


@dataclass
class Record:
    index: int
    offset: int  # of the record header
    rtype: int
    flags: int
    payload: memoryview  # valid only until the next record is read
    # A chunk whose data the reader skipped (``RecordReader.skip_chunk_data``): ``payload`` is only
    # the fixed CHUNK part, unchecked, and ``skipped`` bytes follow it. The header's ``checksum``
    # is covered by the trailer digest; whoever fetches the data later must check it.
    skipped: int = 0
    checksum: int = 0

    @property
    def name(self) -> str:
        return F.type_name(self.rtype)


class Readable(Protocol):
    def readinto(self, buf: memoryview, /) -> int | None: ...


class RecordReader:
    """Iterates the records of one image, checked, ending after a verified trailer."""

    def __init__(self, src: Readable, path: str) -> None:
        self._src = src
        self.path = path
        self.offset = 0
        self.index = 0
        self._buf = bytearray(64 << 10)
        self._digest = xxhash.xxh3_128()
        self.records = 0
        self.length = 0
        self.digest = ""
        self.version = (0, 0)
        self._digest_before_trailer = b""
        # Set by a walker for sections whose data it fetches later (a streamed restore): chunk
        # payloads are then seeked over, not read. Needs a seekable source.
        self.skip_chunk_data = False

    def corrupt(self, msg: str, *, offset: int | None = None, rec: Record | None = None) -> CorruptImageError:
        if rec is not None:
            return CorruptImageError(
                msg, path=self.path, offset=rec.offset if offset is None else offset,
                record=rec.index, rtype=rec.name,
            )
        return CorruptImageError(msg, path=self.path, offset=self.offset if offset is None else offset)

    def _read_exact(self, n: int, what: str, rec_index: int | None = None) -> memoryview:
        # n has been bounds-checked by the caller; the buffer only grows to bounded sizes
        if len(self._buf) < n:
            self._buf = bytearray(max(n, 2 * len(self._buf)))
        view = memoryview(self._buf)[:n]
        got = 0
        while got < n:
            try:
                r = self._src.readinto(view[got:])
            except OSError as exc:
                raise UnreadableImageError(
                    f"{self.path}: read error at offset {self.offset + got}: {exc}",
                    hint="check the file's permissions and the filesystem",
                ) from exc
            if not r:
                raise CorruptImageError(
                    f"truncated: the file ends inside the {what} ({got} of {n} bytes)",
                    path=self.path, offset=self.offset + got, record=rec_index,
                    hint="the image was cut short (interrupted write or full disk); "
                    "resume from an older checkpoint (hpcckpt list JOBID)",
                )
            got += r
        self.offset += n
        return view

    def _skip(self, n: int) -> None:
        # A file that ends early is caught at the next record header, or by the trailer's length.
        seek = getattr(self._src, "seek", None)
        if seek is None:
            raise TypeError("skipping chunk data needs a seekable image source")
        try:
            seek(n, os.SEEK_CUR)
        except OSError as exc:
            raise UnreadableImageError(f"{self.path}: cannot seek at offset {self.offset}: {exc}") from exc
        self.offset += n

    def read_preamble(self) -> tuple[int, int]:
        raw = bytes(self._read_exact(F.PREAMBLE.size, "preamble"))
        magic, major, minor, check = F.PREAMBLE.unpack(raw)
        if magic != F.HEAD_MAGIC:
            raise CorruptImageError(
                f"not an hpcckpt image (head magic {magic!r}, expected {F.HEAD_MAGIC!r})",
                path=self.path, offset=0,
                hint="check the path; hpcckpt images are the ckpt-N.hck files in the store",
            )
        if check != xxhash.xxh3_64_intdigest(raw[:12]) & 0xFFFFFFFF:
            raise CorruptImageError("preamble checksum mismatch", path=self.path, offset=8)
        if major not in F.SUPPORTED_MAJOR:
            raise UnsupportedImageError(
                f"{self.path}: image format version {major}.{minor} is not supported "
                f"(this hpcckpt reads major version(s) {sorted(F.SUPPORTED_MAJOR)})",
                hint="read it with the hpcckpt version that wrote it, or upgrade hpcckpt",
            )
        self._digest.update(raw)
        self.version = (major, minor)
        return major, minor

    def _next_raw(self) -> Record:
        start = self.offset
        index = self.index
        head = self._read_exact(F.RECORD_HEADER.size, f"header of record {index}", index)
        head_bytes = bytes(head)
        rtype, flags, length, checksum = F.RECORD_HEADER.unpack(head_bytes)
        if length > F.MAX_PAYLOAD:
            raise CorruptImageError(
                f"record length {length} exceeds the maximum {F.MAX_PAYLOAD}",
                path=self.path, offset=start + 4, record=index, rtype=F.type_name(rtype),
            )
        skipped = 0
        if self.skip_chunk_data and rtype == F.T_CHUNK and length > F.CHUNK.size:
            payload = self._read_exact(F.CHUNK.size, f"payload of record {index}", index)
            skipped = length - F.CHUNK.size
            self._skip(skipped)
        else:
            payload = self._read_exact(length, f"payload of record {index}", index)
            if record_checksum(index, head_bytes[: F.RECORD_HEADER_CHECKED], [payload]) != checksum:
                raise CorruptImageError(
                    f"checksum mismatch over {length} payload bytes",
                    path=self.path, offset=start, record=index, rtype=F.type_name(rtype),
                )
        rec = Record(index, start, rtype, flags, payload, skipped, checksum)
        if flags & ~F.RF_KNOWN:
            raise self.corrupt(f"reserved flag bits set (flags {flags:#06x})", rec=rec, offset=start + 2)
        if rtype == F.T_TRAILER:
            self._digest_before_trailer = self._digest.digest()
        else:
            self._digest.update(head_bytes)
        self.index += 1
        return rec

    def __iter__(self) -> Iterator[Record]:
        while True:
            rec = self._next_raw()
            if rec.rtype == F.T_TRAILER:
                self._check_trailer(rec)
                return
            if rec.rtype not in F.TYPE_NAMES:
                if rec.flags & F.RF_OPTIONAL:
                    continue  # a later minor version's optional record: skipping it is safe
                raise UnsupportedImageError(
                    f"{self.path}: offset {rec.offset}, record {rec.index}: unknown record type "
                    f"{rec.rtype} not marked optional (format {self.version[0]}.{self.version[1]})",
                    hint="this image needs a newer hpcckpt",
                )
            yield rec

    def _check_trailer(self, rec: Record) -> None:
        if rec.payload.nbytes != F.TRAILER.size:
            raise self.corrupt(f"trailer payload is {rec.payload.nbytes} bytes, expected {F.TRAILER.size}",
                               rec=rec)
        magic, records, total, digest = F.TRAILER.unpack(rec.payload)
        expected = self._digest_before_trailer
        if magic != F.TAIL_MAGIC:
            raise self.corrupt(f"bad tail magic {magic!r}", rec=rec)
        if records != rec.index + 1:
            raise self.corrupt(f"trailer counts {records} records, image has {rec.index + 1}", rec=rec)
        if total != self.offset:
            raise self.corrupt(f"trailer says {total} bytes, image has {self.offset}", rec=rec)
        if digest != expected:
            raise self.corrupt("image digest mismatch", rec=rec)
        try:
            extra = self._src.readinto(memoryview(bytearray(1)))
        except OSError as exc:
            raise UnreadableImageError(f"{self.path}: read error after the trailer: {exc}") from exc
        if extra:
            raise CorruptImageError(
                "data after the trailer", path=self.path, offset=self.offset, record=rec.index,
                rtype=rec.name,
            )
        self.records = records
        self.length = total
        self.digest = digest.hex()

    def next_record(self) -> Record:
        """One record, for callers that stop early (read_header); no trailer handling."""
        return self._next_raw()
