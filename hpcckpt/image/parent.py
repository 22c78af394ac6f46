"""Incremental images: which chunks an earlier image already holds, and fetching them back.

An incremental image stores a CHUNK_REF instead of a CHUNK when an earlier
image of the chain already stores a CHUNK with the same content hash and
length. Refs always name the image whose CHUNK record holds the bytes (one
hop, never a ref to a ref), so restore reads each chunk from exactly one
file and a chain can never loop.

Two indexes, for the two sides:

* :class:`ParentIndex` (writer): content hash -> where the bytes live. Built
  from the parent image by reading only record headers and chunk headers
  (seeking over the data), or handed over by ``pack_dir`` for the image it
  just wrote, so the next checkpoint needs no read of the store at all.
* :class:`ChunkSource` (reader): fetches and checks referenced chunks for
  ``unpack_image``, or fully verifies every referenced image once for
  ``verify_image``.

Chain bookkeeping lives in the image header's ``meta.extra["chain"]``:
``depth`` (incremental images since the last full one), ``base`` (ckptid of
that full image), ``base_bytes`` (its size) and ``bytes_before`` (the sizes
of the chain's images before this one, summed), so chain bounding works
after a restart from the image alone.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from hpcckpt.image import format as F
from hpcckpt.image.errors import CorruptImageError, UnreadableImageError, UnsupportedImageError
from hpcckpt.image.fetch import ChunkBuffer, read_chunk
from hpcckpt.image.files import open_image_fd
from hpcckpt.image.header import parse_header
from hpcckpt.image.model import ImageMeta, ImageSummary
from hpcckpt.image.records import Readable, RecordReader, record_checksum
from hpcckpt.image.refs import ChunkKey, ChunkLocation, ParentIndex, ResolveParent


def index_image(path: Path | str) -> ParentIndex:
    """Index an image by its chunk headers only (seeks over the data: cheap).

    The bytes are not checked here; every referenced chunk is checked by
    its record checksum and content hash when it is read back.
    """
    with _open(Path(path)) as f:
        meta, scan = _scan(f, os.fspath(path))
        if meta.ckptid <= 0:
            raise UnsupportedImageError(
                f"{path}: image has ckptid {meta.ckptid}; only catalogued checkpoints can be parents",
                hint="pack a full image instead",
            )
        chain = chain_info(meta, os.fspath(path))
        size = os.fstat(f.fileno()).st_size
        idx = ParentIndex(
            ckptid=meta.ckptid, job_id=meta.job_id, uid=meta.uid, depth=chain["depth"],
            base=chain["base"] or meta.ckptid, base_bytes=chain["base_bytes"] or size,
            chain_bytes=chain["bytes_before"] + size,
        )
        for item in scan:
            if item.length >= F.MIN_REF:
                owner = meta.ckptid if item.ref is None else item.ref
                idx.chunks.setdefault(
                    (item.digest, item.length), ChunkLocation(owner, item.section, item.offset, item.length)
                )
    return idx




def chain_info(meta: ImageMeta, where: str) -> dict[str, int]:
    """The header's chain bookkeeping, type-checked (zeros for a full image)."""
    raw = meta.extra.get("chain")
    out = {"depth": 0, "base": 0, "base_bytes": 0, "bytes_before": 0}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        raise CorruptImageError("header meta.extra.chain is not an object", path=where)
    for key in out:
        val = raw.get(key, 0)
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise CorruptImageError(f"header meta.extra.chain.{key} is not a non-negative integer", path=where)
        out[key] = val
    return out


# --- scanning an image's chunk headers --------------------------------------


@dataclass
class _Scanned:
    section: str
    offset: int
    length: int
    digest: bytes
    ref: int | None  # ckptid for a CHUNK_REF, None for a CHUNK
    rec_offset: int
    rec_index: int


@contextlib.contextmanager
def _open(path: Path) -> Iterator[BinaryIO]:
    # No symlinks: root may resolve parents inside a user's job dir. An unreadable parent is an
    # image problem (a resume falls back to an older image), not the caller's missing right.
    fd = open_image_fd(path, role="parent image", follow_symlinks=False, denied=UnreadableImageError,
                       missing_hint="the chain is broken; resume from a full checkpoint (hpcckpt list JOBID)")
    f = os.fdopen(fd, "rb", buffering=64 << 10)
    try:
        yield f
    finally:
        f.close()


def _scan(f: BinaryIO, name: str) -> tuple[ImageMeta, Iterator[_Scanned]]:
    """The image's header, and its chunks' and refs' headers in order."""
    r = RecordReader(cast(Readable, f), name)
    r.read_preamble()
    meta, _ = parse_header(r, r.next_record())
    return meta, _scan_body(f, name, r.offset, r.index)


def _scan_body(f: BinaryIO, name: str, offset: int, index: int) -> Iterator[_Scanned]:
    # pread of the few bytes each record needs: a buffered reader would pull a whole buffer
    # per chunk it seeks over, which on a cold cache reads a good part of the image.
    return _scan_records(f.fileno(), name, offset, index)


def _scan_records(fd: int, name: str, offset: int, index: int) -> Iterator[_Scanned]:
    section = ""
    while True:
        # The header and a CHUNK's fixed part in one read (the rest of a small record follows).
        first = os.pread(fd, F.RECORD_HEADER.size + F.CHUNK.size, offset)
        head = first[: F.RECORD_HEADER.size]
        if len(head) != F.RECORD_HEADER.size:
            raise CorruptImageError("truncated record header", path=name, offset=offset, record=index)
        rtype, _flags, length, checksum = F.RECORD_HEADER.unpack(head)
        if length > F.MAX_PAYLOAD:
            raise CorruptImageError(f"record length {length} exceeds {F.MAX_PAYLOAD}", path=name,
                                    offset=offset, record=index)
        if rtype == F.T_TRAILER:
            return
        body = offset + F.RECORD_HEADER.size
        if rtype in (F.T_SECTION_BEGIN, F.T_CHUNK_REF):
            payload = os.pread(fd, length, body)  # small records: check them whole
            if len(payload) != length or record_checksum(index, head[:8], [payload]) != checksum:
                raise CorruptImageError("checksum mismatch", path=name, offset=offset, record=index,
                                        rtype=F.type_name(rtype))
            if rtype == F.T_SECTION_BEGIN:
                section = payload[F.SECTION_BEGIN.size :].decode("utf-8", "surrogateescape")
            elif len(payload) == F.CHUNK_REF.size:
                _, _, ckptid, off, raw_len, digest = F.CHUNK_REF.unpack(payload)
                yield _Scanned(section, off, raw_len, digest, ckptid, offset, index)
        elif rtype == F.T_CHUNK and length >= F.CHUNK.size:
            fixed = first[F.RECORD_HEADER.size :]
            if len(fixed) == F.CHUNK.size:
                _, _, _, _, off, raw_len, digest = F.CHUNK.unpack(fixed)
                yield _Scanned(section, off, raw_len, digest, None, offset, index)
        offset = body + length
        index += 1


# --- reading referenced chunks back -----------------------------------------


class _Image:
    """One referenced image: its open file and, filled in by a thread of its own, where each chunk is.

    The header (which checkpoint, whose) is checked at once; the index of
    stored chunks is built in the background by hopping over the records,
    and :meth:`location` waits only until the chunk asked for has been seen.
    A restore thus starts reading (or starts CRIU) while a parent of a
    thousand chunks is still being indexed, instead of after.
    """

    def __init__(self, ckptid: int, path: Path, child: ImageMeta, child_name: str) -> None:
        self.path = path
        self.name = os.fspath(path)
        self._ctx = _open(path)
        self.f = self._ctx.__enter__()
        self.stored: dict[ChunkKey, tuple[int, int]] = {}
        self._seen = threading.Condition()
        self._done = False
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        try:
            meta, scan = _scan(self.f, self.name)
            if meta.ckptid != ckptid:
                raise CorruptImageError(
                    f"is checkpoint {meta.ckptid}, but {child_name} refers to checkpoint {ckptid} here",
                    path=self.name, offset=0, hint="the catalog points to the wrong file; run 'hpcckpt catalog check'",
                )
            if meta.uid != child.uid:
                raise CorruptImageError(
                    f"belongs to uid {meta.uid}, but {child_name} (uid {child.uid}) refers to it",
                    path=self.name, offset=0, hint="an image may only refer to images of its own user",
                )
            self.meta = meta
            self._thread = threading.Thread(target=self._index, args=(scan,), name="hpcckpt-parent-index",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def _index(self, scan: Iterator[_Scanned]) -> None:
        try:
            for item in scan:
                if self._stop:
                    return
                if item.ref is None:
                    with self._seen:
                        self.stored.setdefault((item.digest, item.length), (item.rec_offset, item.rec_index))
                        self._seen.notify_all()
        except BaseException as exc:  # handed to whoever looks a chunk up
            self._error = exc
        finally:
            with self._seen:
                self._done = True
                self._seen.notify_all()

    def location(self, digest: bytes, length: int, child_name: str) -> tuple[int, int]:
        """(record offset, record index) of the stored chunk, or CorruptImageError when it is not here."""
        key = (digest, length)
        with self._seen:
            self._seen.wait_for(lambda: key in self.stored or self._done)
            where = self.stored.get(key)
        if where is None:
            if self._error is not None:
                raise self._error
            raise CorruptImageError(
                f"does not store the chunk ({length} bytes, hash {digest.hex()}) that {child_name} refers to",
                path=self.name, hint="the chain is broken; resume from a full checkpoint (hpcckpt list JOBID)",
            )
        return where

    def read(self, digest: bytes, length: int, child_name: str, buf: ChunkBuffer | None = None
             ) -> bytes | memoryview:
        """The chunk's bytes, checked; pread on the raw descriptor, so threads may share this image."""
        rec_offset, rec_index = self.location(digest, length, child_name)
        return read_chunk(self.f.fileno(), self.name, rec_offset, rec_index, digest, length, buf,
                          what="referenced chunk")

    def close(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join()  # it reads through our descriptor: never close that under it
        self._ctx.__exit__(None, None, None)


#: Verifies one image of a chain, sharing what is verified already: (summary, the chunk keys it stores).
VerifyMember = Callable[[Path, "ResolveParent | None", dict[int, set[ChunkKey]]], tuple[ImageSummary, set[ChunkKey]]]


class ChunkSource:
    """Gives the reader the bytes (unpack) or the certainty (verify) behind each CHUNK_REF."""

    def __init__(self, resolve_parent: ResolveParent | None, child: ImageMeta, child_name: str,
                 *, verify_whole: bool, verify_member: VerifyMember,
                 verified: dict[int, set[ChunkKey]] | None = None) -> None:
        self._resolve = resolve_parent
        self._verify_member = verify_member  # the reader's own, handed down: it reads this module
        self._child = child
        self._child_name = child_name
        self._verify_whole = verify_whole
        self._open: dict[int, _Image] = {}
        self._lock = threading.Lock()
        # shared along a chain, so each image is verified once however many children refer to it
        self._verified: dict[int, set[ChunkKey]] = {} if verified is None else verified
        self.parents: set[int] = set()
        self.ref_bytes = 0
        self.unchecked = False

    def _path(self, ckptid: int) -> Path:
        if self._resolve is None:
            raise UnsupportedImageError(
                f"{self._child_name}: incremental image (refers to checkpoint {ckptid}); "
                "reading it needs its parent images",
                hint="use 'hpcckpt verify CKPTID' or restore through the catalog, which find the parents",
            )
        return Path(self._resolve(ckptid))

    def get(self, ckptid: int, digest: bytes, length: int) -> bytes | memoryview | None:
        """The referenced bytes (unpack), or None once the chunk is known good (verify)."""
        self.parents.add(ckptid)
        self.ref_bytes += length
        if self._verify_whole and self._resolve is None:
            # Checks this file alone (the epilog's "is this image complete?"); the
            # summary lists the parents left unchecked (parents_verified is False).
            self.unchecked = True
            return None
        if self._verify_whole:
            if ckptid not in self._verified:
                self._verified[ckptid] = self._verify(ckptid)
            if (digest, length) not in self._verified[ckptid]:
                raise CorruptImageError(
                    f"refers to a chunk ({length} bytes, hash {digest.hex()}) that checkpoint {ckptid} "
                    "does not store", path=self._child_name,
                    hint="the chain is broken; resume from a full checkpoint (hpcckpt list JOBID)",
                )
            return None
        return self._image(ckptid).read(digest, length, self._child_name)

    def _image(self, ckptid: int) -> _Image:
        with self._lock:
            img = self._open.get(ckptid)
            if img is None:
                img = self._open[ckptid] = _Image(ckptid, self._path(ckptid), self._child, self._child_name)
            return img

    def check(self, ckptid: int, digest: bytes, length: int) -> None:
        """Open image ``ckptid`` (checking whose and which it is) for a chunk fetched later.

        Whether it stores the chunk is known once its index reaches it;
        :meth:`fetch` waits for that and raises if not, so a streamed restore
        does not wait here for the index of a whole parent before CRIU starts.
        """
        self.parents.add(ckptid)
        self.ref_bytes += length
        self._image(ckptid)

    def fetch(self, ckptid: int, digest: bytes, length: int, buf: ChunkBuffer | None = None
              ) -> bytes | memoryview:
        """The chunk's bytes, checked, into ``buf``; safe to call from several threads."""
        return self._image(ckptid).read(digest, length, self._child_name, buf)

    def _verify(self, ckptid: int) -> set[ChunkKey]:
        """Verify the whole referenced image (and its own chain); its stored chunk keys."""
        path = self._path(ckptid)
        summary, stored = self._verify_member(path, self._resolve, self._verified)
        if summary.meta.ckptid != ckptid or summary.meta.uid != self._child.uid:
            raise CorruptImageError(
                f"is checkpoint {summary.meta.ckptid} of uid {summary.meta.uid}, but {self._child_name} "
                f"refers to checkpoint {ckptid} of uid {self._child.uid}", path=os.fspath(path),
                hint="the catalog points to the wrong file; run 'hpcckpt catalog check'",
            )
        if summary.errors:
            raise CorruptImageError(f"records a failed checkpoint, yet {self._child_name} refers to it",
                                    path=os.fspath(path))
        return stored

    def close(self) -> None:
        for img in self._open.values():
            img.close()
        self._open.clear()
