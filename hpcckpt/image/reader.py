"""Reading images: the record grammar, checked record by record, into a summary.

:func:`walk` is the one parser; ``verify_image`` runs it with a sink that
discards data and ``unpack_image`` with one that writes files. Every chunk is
decompressed and its content hash checked in both cases, so "verify passed"
means "unpack would get exactly the bytes that were packed".

An incremental image's CHUNK_REFs are followed through ``resolve_parent``
(ckptid -> path): unpack reads and checks each referenced chunk; verify
checks every referenced image whole, recursively, once each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol, cast, runtime_checkable

import xxhash

from hpcckpt import progress
from hpcckpt.image import format as F
from hpcckpt.image.codec import CodecError, decompress
from hpcckpt.image.errors import CorruptImageError, UnsafeImageError
from hpcckpt.image.fetch import ChunkAt
from hpcckpt.image.files import open_image_fd
from hpcckpt.image.header import json_payload, parse_header
from hpcckpt.image.model import (
    FieldError,
    ImageMeta,
    ImageSummary,
    OpenFile,
    SectionInfo,
    TaskInfo,
    files_from_json,
    tasks_from_json,
)
from hpcckpt.image.names import SectionNameError, check_name
from hpcckpt.image.parent import ChunkSource
from hpcckpt.image.records import Readable, Record, RecordReader
from hpcckpt.image.refs import ChunkKey, ResolveParent

_READ_BUFFER = 1 << 20


class Sink(Protocol):
    """Receives a verified image's content, in order."""

    def begin(self, info: SectionInfo, mtime_ns: int) -> None: ...
    def data(self, offset: int, raw: bytes | memoryview) -> None: ...
    def end(self) -> None: ...


@runtime_checkable
class DeferringSink(Sink, Protocol):
    """A sink that takes some sections' chunks as locations, to fetch and check them later itself.

    For such a section the walker reads no chunk data: each chunk's
    :class:`ChunkAt` goes to :meth:`later`, and each parent referred to is
    opened and checked to be the right image. Everything else (structure,
    small records, the trailer digest over every record header) is checked
    as in a full walk.
    """

    def defer(self, info: SectionInfo) -> bool: ...
    def later(self, chunk: ChunkAt) -> None: ...


class NullSink:
    def begin(self, info: SectionInfo, mtime_ns: int) -> None:
        pass

    def data(self, offset: int, raw: bytes | memoryview) -> None:
        pass

    def end(self) -> None:
        pass


@contextmanager
def open_source(src: Path | str | BinaryIO, buffering: int = _READ_BUFFER) -> Iterator[tuple[Readable, str]]:
    """(stream, name for messages) for a path or an already open binary stream."""
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        f = os.fdopen(open_image_fd(name), "rb", buffering=buffering)
        meter = progress.current()
        try:
            if meter is None:
                yield cast(Readable, f), name
            else:
                meter.start(os.path.basename(name), os.fstat(f.fileno()).st_size)
                yield cast(Readable, progress.CountingReader(f, meter)), name
                meter.finish()
        finally:
            f.close()
    else:
        sname = getattr(src, "name", None)
        stream = cast(Readable, src) if hasattr(src, "readinto") else _ReadAdapter(src)
        yield stream, sname if isinstance(sname, str) else "<stream>"


class _ReadAdapter:
    """readinto() for streams that only have read() (typing.BinaryIO promises no more)."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src

    def readinto(self, buf: memoryview, /) -> int:
        data = self._src.read(buf.nbytes)
        buf[: len(data)] = data
        return len(data)


class _Walker:
    def __init__(self, r: RecordReader, sink: Sink, ckptid: int, refs: ChunkSource) -> None:
        self.r = r
        self.sink = sink
        self.ckptid = ckptid
        self.refs = refs
        self.stored: set[ChunkKey] = set()  # what a child image may refer to
        self.tasks: list[TaskInfo] = []
        self.files: list[OpenFile] = []
        self.sections: list[SectionInfo] = []
        self.errors: list[str] = []
        self.names: set[str] = set()
        self.dirs: set[str] = set()  # every directory a name implies, declared or not
        self.body = False  # past the task and file lists
        self.cur: SectionInfo | None = None
        self.offset = 0
        self.chunks = 0
        self.deferring = False  # the current section's chunks go to the sink as locations
        # isinstance() against a runtime-checkable protocol is slow: once per walk, not per record
        self.deferrer = sink if isinstance(sink, DeferringSink) else None

    def record(self, rec: Record) -> None:
        t = rec.rtype
        if t == F.T_HEADER:
            raise self.r.corrupt("second image header", rec=rec)
        if t in (F.T_TASKS, F.T_FILES):
            if self.body:
                raise self.r.corrupt(f"{rec.name} record after the first section", rec=rec)
            doc = json_payload(self.r, rec, rec.payload)
            try:
                if t == F.T_TASKS:
                    self.tasks.extend(tasks_from_json(doc))
                else:
                    self.files.extend(files_from_json(doc))
            except FieldError as exc:
                raise self.r.corrupt(str(exc), rec=rec) from exc
            return
        self.body = True
        if t == F.T_SECTION_BEGIN:
            self.begin(rec)
        elif t == F.T_CHUNK:
            self.chunk(rec)
        elif t == F.T_CHUNK_REF:
            self.chunk_ref(rec)
        elif t == F.T_SECTION_END:
            self.end(rec)
        elif t == F.T_ERROR:
            if self.cur is not None:
                raise self.r.corrupt("error record inside a section", rec=rec)
            self.errors.append(_parse_error(self.r, rec))

    def begin(self, rec: Record) -> None:
        if self.cur is not None:
            raise self.r.corrupt(f"section {len(self.sections)} begins before section {self.cur.name!r} ends",
                                 rec=rec)
        p = rec.payload
        if p.nbytes < F.SECTION_BEGIN.size:
            raise self.r.corrupt("section header too short", rec=rec)
        num, kind, codec, reserved, mode, size, mtime_ns, name_len = F.SECTION_BEGIN.unpack(
            p[: F.SECTION_BEGIN.size]
        )
        if num != len(self.sections) or num >= F.MAX_SECTIONS:
            raise self.r.corrupt(f"section number {num}, expected {len(self.sections)}", rec=rec)
        if kind not in F.KIND_NAMES or codec not in F.CODEC_NAMES or reserved:
            raise self.r.corrupt(f"section kind {kind} / codec {codec} / reserved {reserved} invalid", rec=rec)
        if name_len != p.nbytes - F.SECTION_BEGIN.size:
            raise self.r.corrupt(f"section name length {name_len} disagrees with the record length", rec=rec)
        if kind == F.K_DIR and size:
            raise self.r.corrupt("a directory section with a size", rec=rec)
        try:
            name = check_name(bytes(p[F.SECTION_BEGIN.size :]))
        except SectionNameError as exc:
            raise UnsafeImageError(
                f"{self.r.path}: offset {rec.offset}, record {rec.index} (section_begin): {exc}",
                hint="this image tries to write outside its directory; do not use it",
            ) from exc
        self._claim(name, kind, rec)
        self.cur = SectionInfo(
            name=name, mode=mode, size=size, stored=0, codec=F.CODEC_NAMES[codec],
            kind=F.KIND_NAMES[kind], chunks=0,
        )
        self.offset = 0
        self.chunks = 0
        self.sink.begin(self.cur, mtime_ns)
        self.deferring = self.deferrer is not None and self.deferrer.defer(self.cur)
        self.r.skip_chunk_data = self.deferring

    def _claim(self, name: str, kind: int, rec: Record) -> None:
        # A name used twice, or a file where another name needs a directory, would
        # make unpack overwrite or fail halfway: refuse such images up front.
        parents = name.split("/")[:-1]
        for i in range(len(parents)):
            d = "/".join(parents[: i + 1])
            if d in self.names and d not in self.dirs:
                raise self.r.corrupt(f"section {name!r} lies under the file section {d!r}", rec=rec)
        if name in self.names or (kind == F.K_FILE and name in self.dirs):
            raise self.r.corrupt(f"section name {name!r} used twice", rec=rec)
        self.names.add(name)
        self.dirs.update("/".join(parents[: i + 1]) for i in range(len(parents)))
        if kind == F.K_DIR:
            self.dirs.add(name)

    def _place(self, rec: Record, cur: SectionInfo, offset: int, raw_len: int) -> None:
        if cur.kind != "file":
            raise self.r.corrupt(f"{rec.name} in a directory section", rec=rec)
        if offset != self.offset:
            raise self.r.corrupt(f"{rec.name} at section offset {offset}, expected {self.offset}", rec=rec)
        if not 0 < raw_len <= F.MAX_CHUNK or offset + raw_len > cur.size:
            raise self.r.corrupt(f"{rec.name} of {raw_len} bytes at {offset} does not fit section size {cur.size}",
                                 rec=rec)

    def chunk_ref(self, rec: Record) -> None:
        cur = self.cur
        if cur is None:
            raise self.r.corrupt("chunk ref outside a section", rec=rec)
        if rec.payload.nbytes != F.CHUNK_REF.size:
            raise self.r.corrupt("chunk ref record has the wrong length", rec=rec)
        num, reserved, ckptid, offset, raw_len, digest = F.CHUNK_REF.unpack(rec.payload)
        if num != len(self.sections) or reserved:
            raise self.r.corrupt(f"chunk ref header invalid (section {num})", rec=rec)
        # Refs point strictly backwards (catalog ids grow), so a chain cannot loop.
        if ckptid == 0 or (self.ckptid and ckptid >= self.ckptid):
            raise self.r.corrupt(f"chunk ref to checkpoint {ckptid} from checkpoint {self.ckptid}", rec=rec)
        self._place(rec, cur, offset, raw_len)
        digest = bytes(digest)
        if self.deferring:
            assert self.deferrer is not None
            self.refs.check(ckptid, digest, raw_len)
            self.deferrer.later(ChunkAt(offset, raw_len, digest, ref=ckptid))
        elif (raw := self.refs.get(ckptid, digest, raw_len)) is not None:
            self.sink.data(offset, raw)
        self.offset += raw_len
        self.chunks += 1

    def chunk(self, rec: Record) -> None:
        cur = self.cur
        if cur is None:
            raise self.r.corrupt("chunk outside a section", rec=rec)
        p = rec.payload
        if p.nbytes < F.CHUNK.size:
            raise self.r.corrupt("chunk record too short", rec=rec)
        num, codec, r1, r2, offset, raw_len, digest = F.CHUNK.unpack(p[: F.CHUNK.size])
        if num != len(self.sections) or r1 or r2 or codec not in F.CODEC_NAMES:
            raise self.r.corrupt(f"chunk header invalid (section {num}, codec {codec})", rec=rec)
        self._place(rec, cur, offset, raw_len)
        if rec.skipped:  # its data is checked when the sink fetches it
            assert self.deferrer is not None
            self.deferrer.later(ChunkAt(offset, raw_len, bytes(digest), rec_offset=rec.offset, rec_index=rec.index,
                                    checksum=rec.checksum))
            stored_bytes = rec.skipped
        else:
            stored = p[F.CHUNK.size :]
            try:
                raw = decompress(codec, stored, raw_len)
            except CodecError as exc:
                raise self.r.corrupt(str(exc), rec=rec) from exc
            if xxhash.xxh3_128_digest(raw) != digest:
                raise self.r.corrupt("chunk content hash mismatch after decoding", rec=rec)
            self.sink.data(offset, raw)
            self.stored.add((bytes(digest), raw_len))
            stored_bytes = stored.nbytes
        self.offset += raw_len
        self.chunks += 1
        cur.stored += stored_bytes

    def end(self, rec: Record) -> None:
        cur = self.cur
        if cur is None:
            raise self.r.corrupt("section end without a section", rec=rec)
        if rec.payload.nbytes != F.SECTION_END.size:
            raise self.r.corrupt("section end record has the wrong length", rec=rec)
        num, chunks, size = F.SECTION_END.unpack(rec.payload)
        if num != len(self.sections) or chunks != self.chunks or size != cur.size or self.offset != cur.size:
            raise self.r.corrupt(
                f"section {cur.name!r} ends with {self.chunks} chunks / {self.offset} bytes, "
                f"its records say {chunks} chunks / {size} bytes (declared {cur.size})", rec=rec,
            )
        cur.chunks = chunks
        self.sink.end()
        self.sections.append(cur)
        self.cur = None
        self.deferring = self.r.skip_chunk_data = False


def _parse_error(r: RecordReader, rec: Record) -> str:
    p = bytes(rec.payload)
    if len(p) > F.MAX_ERROR or not p.startswith(b"\0") or p.count(b"\0") < 2:
        raise r.corrupt("malformed error record", rec=rec)
    msg, _, detail = p[1:].partition(b"\0")
    text = msg.decode("utf-8", "replace")
    if detail:
        text += "\n" + detail.decode("utf-8", "replace")
    return text


def _walk(
    src: Path | str | BinaryIO, sink: Sink, resolve_parent: ResolveParent | None, *, verify_whole: bool,
    verified: dict[int, set[ChunkKey]] | None = None, keep: list[ChunkSource] | None = None,
) -> tuple[ImageSummary, set[ChunkKey]]:
    """The one walk. With ``keep``, the parents stay open (appended there) for the caller to fetch from."""
    # A sink that defers sections needs to seek over their data: read unbuffered, or a buffered
    # reader would pull in much of what is skipped.
    unbuffered = isinstance(sink, DeferringSink)
    with open_source(src, buffering=0 if unbuffered else _READ_BUFFER) as (stream, name):
        r = RecordReader(stream, name)
        r.read_preamble()
        records = iter(r)
        first = next(records, None)
        if first is None:
            raise CorruptImageError("no image header before the trailer", path=name, offset=F.PREAMBLE.size)
        meta, header = parse_header(r, first)
        refs = ChunkSource(resolve_parent, meta, name, verify_whole=verify_whole, verify_member=verify_chain_member,
                           verified=verified)
        w = _Walker(r, sink, meta.ckptid, refs)
        try:
            for rec in records:
                w.record(rec)
        except BaseException:
            refs.close()
            raise
        if keep is None:
            refs.close()
        else:
            keep.append(refs)
        if w.cur is not None:
            raise CorruptImageError(
                f"trailer inside section {w.cur.name!r}", path=name, offset=r.offset, record=r.records - 1,
                rtype="trailer",
            )
    summary = ImageSummary(
        meta=meta, header=header, tasks=w.tasks, files=w.files, sections=w.sections, errors=w.errors,
        records=r.records, length=r.length, digest=r.digest, parents=sorted(refs.parents), ref_bytes=refs.ref_bytes,
        parents_verified=not refs.unchecked,
    )
    return summary, w.stored


def walk(src: Path | str | BinaryIO, sink: Sink, resolve_parent: ResolveParent | None = None) -> ImageSummary:
    """Parse and check a whole image, feeding its content (refs resolved) to ``sink``."""
    return _walk(src, sink, resolve_parent, verify_whole=False)[0]


def walk_deferred(
    src: Path | str, sink: DeferringSink, resolve_parent: ResolveParent | None
) -> tuple[ImageSummary, ChunkSource]:
    """:func:`walk` for a sink that defers sections; the parents stay open for fetching (close them)."""
    keep: list[ChunkSource] = []
    summary = _walk(src, sink, resolve_parent, verify_whole=False, keep=keep)[0]
    return summary, keep[0]


def verify_image(src: Path | str | BinaryIO, resolve_parent: ResolveParent | None = None) -> ImageSummary:
    """Check every byte of an image; raises Corrupt/Unsupported/Unreadable/UnsafeImageError.

    For an incremental image, every image it refers to is verified whole too
    (through ``resolve_parent``), and each ref is checked against what that
    image stores. Without ``resolve_parent`` only this file is checked (refs
    for their structure) and the summary says ``parents_verified=False``.
    """
    return _walk(src, NullSink(), resolve_parent, verify_whole=True)[0]


def verify_chain_member(
    path: Path, resolve_parent: ResolveParent | None, verified: dict[int, set[ChunkKey]]
) -> tuple[ImageSummary, set[ChunkKey]]:
    """Verify one image of a chain, sharing ``verified`` (ckptid -> stored chunks) across the chain."""
    return _walk(path, NullSink(), resolve_parent, verify_whole=True, verified=verified)


def read_header(src: Path | str) -> ImageMeta:
    """Only the preamble and header record: cheap, for listing many images."""
    with open_source(src) as (stream, name):
        r = RecordReader(stream, name)
        r.read_preamble()
        meta, _ = parse_header(r, r.next_record())
        return meta
