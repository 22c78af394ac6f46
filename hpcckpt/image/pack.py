"""Writing images: a directory (a CRIU dump, application files) or a failure record.

The source tree is walked through directory file descriptors with
O_NOFOLLOW, because pack runs as root over directories a job could have
written into: a symlink planted there must not pull /etc/shadow into an image.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import xxhash

from hpcckpt import log as hlog
from hpcckpt.errors import StoreError
from hpcckpt.image import format as F
from hpcckpt.image.encode import ChunkEncoder, Encoded
from hpcckpt.image.model import ImageMeta, OpenFile, PackStats, TaskInfo, to_json_list
from hpcckpt.image.names import SectionNameError, check_name, encode_name
from hpcckpt.image.records import RecordWriter
from hpcckpt.image.refs import ChunkLocation, ParentIndex
from hpcckpt.image.system import system_info

_log = hlog.get("image")

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in after the scan must not hang the open
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass
class _Entry:
    name: str  # relative, '/'-separated
    kind: int
    st: os.stat_result


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")


def _header_payload(meta: ImageMeta) -> bytes:
    doc = {"system": system_info(), "meta": meta.to_dict()}
    blob = _json(doc)
    if len(blob) > F.MAX_JSON:
        raise StoreError(
            f"image header metadata is {len(blob)} bytes, over the {F.MAX_JSON} limit",
            hint="shorten the job's command line or the engine's extra metadata",
        )
    return F.HEADER_FIXED.pack(meta.flags & 0xFFFFFFFF, len(blob), meta.created) + blob


def _fit_task(doc: dict[str, Any]) -> dict[str, Any]:
    # A single argv can approach ARG_MAX (2 MiB): keep what fits rather than fail the checkpoint.
    while len(_json(doc)) > F.MAX_JSON - 64 and doc["cmdline"]:
        doc = dict(doc, cmdline=doc["cmdline"][: len(doc["cmdline"]) // 2])
        _log.warning("task %s: command line truncated to fit the image", doc.get("pid"))
    return doc


def _json_list_records(items: list[dict[str, Any]]) -> Iterator[bytes]:
    """JSON lists, each small enough for one record (tasks and files can be many)."""
    batch: list[bytes] = []
    size = 2
    for item in items:
        enc = _json(_fit_task(item) if "cmdline" in item else item)
        if batch and size + len(enc) + 1 > F.MAX_JSON:
            yield b"[" + b",".join(batch) + b"]"
            batch, size = [], 2
        batch.append(enc)
        size += len(enc) + 1
    if batch:
        yield b"[" + b",".join(batch) + b"]"


def _prepare_meta(meta: ImageMeta, flags: int = 0) -> ImageMeta:
    if meta.ckptid < 0:
        raise ValueError(f"ckptid must be >= 0, got {meta.ckptid}")
    if not 0 <= meta.flags <= 0xFFFFFFFF:
        raise ValueError(f"flags must fit in 32 bits, got {meta.flags:#x}")
    return dataclasses.replace(meta, created=meta.created or time.time(), flags=meta.flags | flags)


def _begin(out: BinaryIO, meta: ImageMeta, tasks: Sequence[TaskInfo], files: Sequence[OpenFile]) -> RecordWriter:
    w = RecordWriter(out)
    w.write(F.T_HEADER, [_header_payload(meta)])
    for blob in _json_list_records(to_json_list(list(tasks))):
        w.write(F.T_TASKS, [blob])
    for blob in _json_list_records(to_json_list(list(files))):
        w.write(F.T_FILES, [blob])
    return w


def _walk(dir_fd: int, prefix: str, src: str) -> Iterator[tuple[_Entry, int]]:
    """(entry, fd of its parent dir) in sorted order, so equal trees give equal images."""
    with os.scandir(dir_fd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        rel = f"{prefix}{name}"
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            yield _Entry(rel, F.K_FILE, st), dir_fd
        elif stat.S_ISDIR(st.st_mode):
            yield _Entry(rel, F.K_DIR, st), dir_fd
            sub = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
            try:
                yield from _walk(sub, rel + "/", src)
            finally:
                os.close(sub)
        else:
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file or directory"
            raise StoreError(
                f"{os.path.join(src, rel)}: {what}; images hold only regular files and directories",
                hint="remove it from the directory, or pack a directory without it",
            )


class _Packer:
    def __init__(self, w: RecordWriter, enc_args: tuple[str, int, int, int], src: str,
                 parent: ParentIndex | None, index: ParentIndex | None) -> None:
        self.w = w
        codec, level, chunk_size, workers = enc_args
        self.chunk_size = chunk_size
        self.enc = ChunkEncoder(codec, level, chunk_size, workers, self._emit)
        self.codec_id = F.CODEC_IDS[codec]
        self.src = src
        self.parent = parent
        self.index = index  # this image's own index, filled as chunks go out
        self.sections = 0
        self.bytes_in = 0
        self.refs = 0
        self.ref_bytes = 0
        self._name = ""

    def section(self, entry: _Entry, parent_fd: int) -> None:
        try:
            raw_name = encode_name(entry.name)
            check_name(raw_name)
        except SectionNameError as exc:
            raise StoreError(f"{os.path.join(self.src, entry.name)}: cannot be stored: {exc}") from exc
        size = entry.st.st_size if entry.kind == F.K_FILE else 0
        codec = self.codec_id if entry.kind == F.K_FILE else F.C_NONE
        begin = F.SECTION_BEGIN.pack(
            self.sections, entry.kind, codec, 0, entry.st.st_mode, size, entry.st.st_mtime_ns, len(raw_name)
        )
        self.w.write(F.T_SECTION_BEGIN, [begin, raw_name])
        self._name = entry.name
        self.enc.adaptive.new_section()
        chunks = self._data(entry, parent_fd, size) if entry.kind == F.K_FILE else 0
        self.w.write(F.T_SECTION_END, [F.SECTION_END.pack(self.sections, chunks, size)])
        self.sections += 1
        self.bytes_in += size

    def _emit(self, item: Encoded) -> None:
        if item.ref_ckptid:
            self.w.write(F.T_CHUNK_REF, [F.CHUNK_REF.pack(
                self.sections, 0, item.ref_ckptid, item.offset, item.raw_len, item.digest)])
        else:
            fixed = F.CHUNK.pack(self.sections, item.codec, 0, 0, item.offset, item.raw_len, item.digest)
            self.w.write(F.T_CHUNK, [fixed, item.stored])

    def _encode(self, buf: bytearray, offset: int, raw_len: int) -> None:
        digest = xxhash.xxh3_128_digest(memoryview(buf)[:raw_len])
        item = Encoded(offset, raw_len, digest, buf)
        found = self.parent.lookup(digest, raw_len) if self.parent and raw_len >= F.MIN_REF else None
        if found is not None:
            item.ref_ckptid = found.ckptid
            self.refs += 1
            self.ref_bytes += raw_len
        if self.index is not None and raw_len >= F.MIN_REF:
            owner = found.ckptid if found is not None else self.index.ckptid
            self.index.chunks.setdefault((digest, raw_len), ChunkLocation(owner, self._name, offset, raw_len))
        self.enc.submit(item)

    def _data(self, entry: _Entry, parent_fd: int, size: int) -> int:
        path = os.path.join(self.src, entry.name)
        fd = os.open(entry.name.rsplit("/", 1)[-1], _OPEN_FILE, dir_fd=parent_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_dev) != (entry.st.st_ino, entry.st.st_dev):
                raise StoreError(f"{path}: replaced while packing", hint="pack a directory nothing else writes")
            offset = 0
            chunks = 0
            with open(fd, "rb", buffering=0, closefd=False) as f:
                # Fixed chunk offsets keep boundaries content-stable between checkpoints,
                # so unchanged memory hashes the same and becomes a reference.
                while offset < size:
                    want = min(self.chunk_size, size - offset)
                    buf = self.enc.buffer()
                    view = memoryview(buf)
                    got = 0
                    while got < want:
                        n = f.readinto(view[got:want])
                        if not n:
                            raise StoreError(f"{path}: shrank while packing (read {offset + got} of {size} bytes)",
                                             hint="pack a directory nothing else writes")
                        got += n
                    self._encode(buf, offset, want)
                    offset += want
                    chunks += 1
                self.enc.flush()
                if f.readinto(bytearray(1)):
                    raise StoreError(f"{path}: grew while packing (beyond {size} bytes)",
                                     hint="pack a directory nothing else writes")
            return chunks
        finally:
            os.close(fd)


def _with_parent(meta: ImageMeta, parent: ParentIndex | None) -> ImageMeta:
    if parent is None:
        return meta
    if meta.parent_ckptid not in (None, parent.ckptid):
        raise ValueError(f"meta.parent_ckptid is {meta.parent_ckptid} but the parent index is of {parent.ckptid}")
    if meta.ckptid and parent.ckptid >= meta.ckptid:
        raise ValueError(f"parent checkpoint {parent.ckptid} is not older than checkpoint {meta.ckptid}")
    if parent.uid != meta.uid:
        raise ValueError(f"parent checkpoint {parent.ckptid} belongs to uid {parent.uid}, not {meta.uid}")
    return dataclasses.replace(meta, parent_ckptid=parent.ckptid,
                               extra={**meta.extra, "chain": parent.chain_extra()})


def pack_dir(
    src: os.PathLike[str] | str,
    out: BinaryIO,
    meta: ImageMeta,
    *,
    tasks: Sequence[TaskInfo] = (),
    files: Sequence[OpenFile] = (),
    codec: str = "none",
    level: int = 3,
    chunk_size: int = F.DEFAULT_CHUNK,
    parent: ParentIndex | None = None,
    workers: int = 1,
) -> PackStats:
    """Write the directory ``src`` as one image to ``out``, in one sequential pass.

    With ``parent`` (an index of an earlier image of the same user), chunks of
    at least ``MIN_REF`` bytes that it already holds are written as
    references: an incremental image (format 1.1). ``workers`` > 1 compresses
    on that many threads. The returned stats carry the new image's own index
    (``stats.index``, when ``meta.ckptid`` > 0) for packing the next one.

    ``out`` is not flushed to disk or closed: durability is the caller's (the
    store's publish does fsync and rename).
    """
    if not F.MIN_CHUNK <= chunk_size <= F.MAX_CHUNK:
        raise ValueError(f"chunk_size must be between {F.MIN_CHUNK} and {F.MAX_CHUNK}, got {chunk_size}")
    if codec not in F.CODEC_IDS:
        raise ValueError(f"unknown codec {codec!r}; use one of {sorted(F.CODEC_IDS)}")
    meta = _prepare_meta(_with_parent(meta, parent))
    chain = parent.chain_extra() if parent is not None else None
    index = (
        ParentIndex(ckptid=meta.ckptid, job_id=meta.job_id, uid=meta.uid,
                    depth=chain["depth"] if chain else 0, base=chain["base"] if chain else meta.ckptid)
        if meta.ckptid > 0 else None
    )
    src_s = os.fspath(src)
    try:
        root = os.open(src_s, _OPEN_DIR)
    except OSError as exc:
        raise StoreError(f"{src_s}: cannot open the directory to pack: {exc.strerror}") from exc
    t0 = time.monotonic()
    try:
        w = _begin(out, meta, tasks, files)
        packer = _Packer(w, (codec, level, chunk_size, workers), src_s, parent, index)
        try:
            for entry, dir_fd in _walk(root, "", src_s):
                packer.section(entry, dir_fd)
        except OSError as exc:
            raise StoreError(f"{exc.filename or src_s}: cannot read while packing: {exc.strerror}") from exc
        finally:
            packer.enc.close()
        records, total, digest = w.finish()
    finally:
        os.close(root)
    if index is not None:
        index.base_bytes = chain["base_bytes"] if chain else total
        index.chain_bytes = (chain["bytes_before"] if chain else 0) + total
    hlog.event(
        _log, "image.packed", f"packed {src_s}", logging.DEBUG, ckptid=meta.ckptid, sections=packer.sections,
        bytes_in=packer.bytes_in, bytes_out=total, codec=codec, seconds=round(time.monotonic() - t0, 3),
        parent=meta.parent_ckptid, refs=packer.refs, ref_bytes=packer.ref_bytes,
    )
    return PackStats(bytes_out=total, bytes_in=packer.bytes_in, records=records, digest=digest,
                     sections=packer.sections, refs=packer.refs, ref_bytes=packer.ref_bytes, index=index)


def error_payload(message: str, detail: str = "") -> bytes:
    """NUL, message, NUL, detail: the leading NUL as in the kernel patchset's ckpt_hdr_err."""
    msg = message.encode("utf-8", "replace")[: F.MAX_ERROR // 4]
    det = detail.encode("utf-8", "replace")[: F.MAX_ERROR - len(msg) - 2]
    return b"\0" + msg + b"\0" + det


def write_error_image(out: BinaryIO, meta: ImageMeta, message: str, detail: str = "") -> PackStats:
    """An image that records only why a checkpoint failed (``hpcckpt info`` shows it)."""
    w = _begin(out, _prepare_meta(meta, F.IF_ERROR), (), ())
    w.write(F.T_ERROR, [error_payload(message, detail)])
    records, total, digest = w.finish()
    return PackStats(bytes_out=total, bytes_in=0, records=records, digest=digest, sections=0)
