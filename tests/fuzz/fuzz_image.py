"""Fuzz the image reader and unpacker (hypothesis-driven).

Run standalone for as long as you like::

    .venv/bin/python -m tests.fuzz.fuzz_image --seconds 600

Inputs start from valid images and are mutated two ways: raw byte edits
(which mostly die at a checksum) and record-level edits that are
re-checksummed and re-trailed, so they reach the grammar, JSON, name and
codec checks behind the checksums. The reader must answer every input with
an hpcckpt ImageError (or accept it), in bounded time and memory; unpack
must leave its target empty whenever it fails and write only below it.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcckpt.errors import HpcckptError
from hpcckpt.image import ImageMeta, OpenFile, TaskInfo, pack_dir, unpack_image, verify_image, write_error_image
from hpcckpt.image import format as F
from hpcckpt.image.records import RecordWriter
from tests.fuzz import driver

Rec = tuple[int, int, bytes]
# Per input; the images are at most a few hundred KiB, so anything slower is a hang.
INPUT_DEADLINE_S = 2.0


@lru_cache(maxsize=1)
def seeds() -> tuple[bytes, ...]:
    tmp = Path(tempfile.mkdtemp(prefix="hpcckpt-fuzz-seed-"))
    try:
        (tmp / "d").mkdir()
        (tmp / "d" / "text").write_bytes(b"line of text\n" * 700)
        (tmp / "rand").write_bytes(os.urandom(5000))
        (tmp / "empty").write_bytes(b"")
        meta = ImageMeta(ckptid=3, job_id="99", engine="criu", cmdline=["./a", "b"], slurm={"SLURM_JOB_ID": "99"})
        tasks = [TaskInfo(1, 0, 1, 1, "init", ["init"]), TaskInfo(2, 1, 1, 1, "work", ["work", "-x"])]
        files = [OpenFile(2, 3, "/scratch/o", 10, 20, "w")]
        out = []
        for codec in ("none", "zstd", "lz4"):
            buf = io.BytesIO()
            pack_dir(tmp, buf, meta, tasks=tasks, files=files, codec=codec, chunk_size=F.MIN_CHUNK)
            out.append(buf.getvalue())
        buf = io.BytesIO()
        write_error_image(buf, meta, "dump failed", "details")
        out.append(buf.getvalue())
        return tuple(out)
    finally:
        shutil.rmtree(tmp)


def split_records(img: bytes) -> list[Rec]:
    """The records of a valid image, trailer excluded."""
    recs: list[Rec] = []
    pos = F.PREAMBLE.size
    while pos < len(img):
        rtype, flags, length, _ = F.RECORD_HEADER.unpack_from(img, pos)
        pos += F.RECORD_HEADER.size
        if rtype == F.T_TRAILER:
            break
        recs.append((rtype, flags, img[pos : pos + length]))
        pos += length
    return recs


def rebuild(recs: list[Rec]) -> bytes:
    buf = io.BytesIO()
    w = RecordWriter(buf)
    for rtype, flags, payload in recs:
        w.write(rtype, [payload[: F.MAX_PAYLOAD]], flags & 0xFFFF)
    w.finish()
    return buf.getvalue()


_types = st.sampled_from([*F.TYPE_NAMES, 0, 9, 200, 0xFFFF])
_u32 = st.integers(0, 0xFFFFFFFF)
_u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
_small = st.integers(0, 20000)


@st.composite
def structured_payload(draw: st.DrawFn) -> Rec:
    """A record of a known type whose fixed fields are plausible but arbitrary."""
    kind = draw(st.sampled_from(["begin", "chunk", "end", "json", "error", "header"]))
    name = draw(st.sampled_from([b"a", b"d", b"d/x", b"../e", b"/abs", b"a/b/c", b"x" * 300]))
    if kind == "begin":
        payload = F.SECTION_BEGIN.pack(
            draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(0, 3)), 0,
            draw(_u32), draw(_small), 0, draw(st.sampled_from([len(name), len(name) + 1, 0])),
        ) + name
        return F.T_SECTION_BEGIN, 0, payload
    if kind == "chunk":
        data = draw(st.binary(max_size=64))
        payload = F.CHUNK.pack(
            draw(st.integers(0, 4)), draw(st.integers(0, 3)), 0, 0, draw(_small), draw(_small),
            draw(st.binary(min_size=16, max_size=16)),
        ) + data
        return F.T_CHUNK, 0, payload
    if kind == "end":
        return F.T_SECTION_END, 0, F.SECTION_END.pack(draw(st.integers(0, 4)), draw(_small), draw(_small))
    if kind == "json":
        doc = draw(st.sampled_from([b"[]", b"[{}]", b"{}", b"[1]", b'[{"pid":1}]', b"[" * 5000, b"\xff"]))
        return draw(st.sampled_from([F.T_TASKS, F.T_FILES])), 0, doc
    if kind == "error":
        return F.T_ERROR, 0, draw(st.binary(max_size=40))
    blob = draw(st.sampled_from([b"{}", b'{"system":{},"meta":{}}', b'{"system":{},"meta":[]}']))
    return F.T_HEADER, 0, struct.pack("<IId", draw(_u32), draw(st.sampled_from([len(blob), 0, 99])), 0.0) + blob


@st.composite
def record_mutant(draw: st.DrawFn) -> bytes:
    recs = split_records(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["edit", "type", "flags", "drop", "dup", "swap", "insert", "truncate"]))
        i = draw(st.integers(0, max(len(recs) - 1, 0)))
        if not recs:
            recs.append(draw(structured_payload()))
            continue
        rtype, flags, payload = recs[i]
        if op == "edit" and payload:
            j = draw(st.integers(0, len(payload) - 1))
            payload = payload[:j] + bytes([draw(st.integers(0, 255))]) + payload[j + 1 :]
            recs[i] = (rtype, flags, payload)
        elif op == "type":
            recs[i] = (draw(_types), flags, payload)
        elif op == "flags":
            recs[i] = (rtype, draw(st.sampled_from([1, 2, 0x8000, 0xFFFF])), payload)
        elif op == "drop":
            del recs[i]
        elif op == "dup":
            recs.insert(i, recs[i])
        elif op == "swap":
            k = draw(st.integers(0, len(recs) - 1))
            recs[i], recs[k] = recs[k], recs[i]
        elif op == "insert":
            recs.insert(i, draw(structured_payload()))
        elif op == "truncate":
            recs[i] = (rtype, flags, payload[: draw(st.integers(0, len(payload)))])
    return rebuild(recs)


@st.composite
def raw_mutant(draw: st.DrawFn) -> bytes:
    img = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate", "length"]))
        pos = draw(st.integers(0, len(img)))
        if op == "set" and pos < len(img):
            img[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            img[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del img[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del img[pos:]
        elif op == "length" and pos + 8 <= len(img):
            struct.pack_into("<I", img, pos, draw(_u32))
    return bytes(img)


inputs = st.one_of(record_mutant(), raw_mutant(), st.binary(max_size=512))


def check_input(img: bytes, scratch: Path) -> None:
    """The properties every input must satisfy; raises AssertionError or the crash itself."""
    t0 = time.monotonic()
    failed_checkpoint = False
    try:
        failed_checkpoint = bool(verify_image(io.BytesIO(img)).errors)
        ok = True
    except HpcckptError:
        ok = False
    assert time.monotonic() - t0 < INPUT_DEADLINE_S, "reader too slow on a small input"
    dest = scratch / "out"
    try:
        unpack_image(io.BytesIO(img), dest)
    except HpcckptError:
        # unpack refuses exactly what verify refuses, plus images of failed checkpoints
        assert not ok or failed_checkpoint, "verify accepted what unpack refused"
        assert not dest.exists(), "a failed unpack left its target directory behind"
    else:
        assert ok and not failed_checkpoint, "unpack accepted what verify refused"
        for p in dest.rglob("*"):
            assert p.resolve().is_relative_to(dest.resolve()) and not p.is_symlink()
        shutil.rmtree(dest)
    assert os.listdir(scratch) == [], "unpack wrote outside its target"


def make_test(max_examples: int) -> Callable[[], None]:
    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(img=inputs)
    def fuzz(img: bytes) -> None:
        scratch = Path(tempfile.mkdtemp(prefix="hpcckpt-fuzz-"))
        try:
            check_input(img, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    return fuzz


def run(seconds: float, batch: int = 300) -> int:
    """Fuzz for about ``seconds``; returns the number of inputs tried."""
    return driver.run(make_test, seconds, batch)


def main(argv: list[str] | None = None) -> int:
    return driver.main(__doc__, "inputs", run, seconds=60.0, batch=300, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
