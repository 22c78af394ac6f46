"""Streamed restores: an image checked but for its page data, which is checked chunk by chunk as served.

The image side (:mod:`hpcckpt.image.stream`) and CRIU's image-streamer
protocol (:mod:`hpcckpt.criu.streamer`), the latter driven from a client
that does exactly what criu/img-streamer.c does. Real ``criu restore
--stream`` runs in tests/criu and tests/pipeline/test_criu_incremental.py.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcckpt.criu.streamer import SOCKET_NAME, ImageStreamer, parse_request, reply
from hpcckpt.errors import EngineError
from hpcckpt.image import format as F
from hpcckpt.image.errors import CorruptImageError, UnreadableImageError
from hpcckpt.image.stream import PreparedImage, is_bulk, prepare_image
from tests.pipeline.test_incremental import Chain
from tests.security import pbcraft

MiB = 1 << 20


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return Chain(tmp_path)


def content(p: PreparedImage, name: str) -> bytes:
    it = p.open(name)
    assert it is not None, name
    return b"".join(bytes(v) for v in it)


def chunk_records(path: Path, at_least: int = 0) -> list[tuple[int, int]]:
    """(record offset, payload length) of the CHUNK records of at least that length, walking the headers."""
    data = path.read_bytes()
    off, out = F.PREAMBLE.size, []
    while off < len(data):
        rtype, _, length, _ = F.RECORD_HEADER.unpack_from(data, off)
        if rtype == F.T_CHUNK and length >= at_least:
            out.append((off, length))
        off += F.RECORD_HEADER.size + length
    return out


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("codec", ["none", "zstd", "lz4"])
def test_small_files_unpacked_pages_streamed_byte_identical(chain: Chain, tmp_path: Path, codec: str) -> None:
    s1 = chain.pack(1, None, codec=codec)
    chain.mem[5 * MiB : 5 * MiB + 100] = os.urandom(100)
    chain.pack(2, s1.index, codec=codec)
    dest = tmp_path / "dest"
    p = prepare_image(chain.path(2), dest, chain.path)
    try:
        assert sorted(os.listdir(dest)) == ["pagemap-1.img"]  # the pages are not written anywhere
        assert p.summary.parents == [1] and p.streamed_bytes == 8 * MiB
        assert content(p, "pages-1.img") == bytes(chain.mem)
        assert content(p, "pagemap-1.img") == b"pm" * 40
        assert p.open("inventory.img") is None and p.open("../ckpt-1.hck") is None
        # a file may be asked for again (criu opens some images twice)
        assert content(p, "pages-1.img") == bytes(chain.mem)
    finally:
        p.close()


def test_is_bulk() -> None:
    from hpcckpt.image.model import SectionInfo

    def info(name: str, size: int) -> SectionInfo:
        return SectionInfo(name=name, mode=0o600, size=size, stored=0, codec="none", kind="file", chunks=0)

    assert is_bulk(info("pages-3.img", 10)) and is_bulk(info("ghost-file-1.img", 64 * MiB))
    assert not is_bulk(info("pagemap-3.img", 10)) and not is_bulk(info("core-1.img", MiB))


def test_a_bad_page_chunk_stops_the_stream_before_its_bytes(chain: Chain, tmp_path: Path) -> None:
    chain.pack(1, None, codec="none")
    off, _ = chunk_records(chain.path(1), MiB)[3]  # the fourth 1 MiB chunk of pages-1.img
    flip(chain.path(1), off + F.RECORD_HEADER.size + F.CHUNK.size + 1000)
    p = prepare_image(chain.path(1), tmp_path / "dest", chain.path)  # structure and trailer are fine
    got = bytearray()
    try:
        it = p.open("pages-1.img")
        assert it is not None
        with pytest.raises(CorruptImageError) as exc:
            for view in it:
                got += view
    finally:
        p.close()
    assert len(got) == 3 * MiB and bytes(got) == bytes(chain.mem[: 3 * MiB])  # nothing of the bad chunk
    assert str(chain.path(1)) in str(exc.value) and f"offset {off}" in str(exc.value)


def test_a_bad_chunk_in_the_parent_stops_the_stream(chain: Chain, tmp_path: Path) -> None:
    s1 = chain.pack(1, None, codec="none")
    chain.mem[:4096] = os.urandom(4096)
    chain.pack(2, s1.index)
    off, _ = chunk_records(chain.path(1), MiB)[6]
    flip(chain.path(1), off + F.RECORD_HEADER.size + F.CHUNK.size + 7)
    p = prepare_image(chain.path(2), tmp_path / "dest", chain.path)
    try:
        with pytest.raises(CorruptImageError, match="referenced chunk checksum mismatch") as exc:
            content(p, "pages-1.img")
    finally:
        p.close()
    assert str(chain.path(1)) in str(exc.value)


@pytest.mark.parametrize("where", ["chunk header", "small section", "truncated", "trailer"])
def test_damage_outside_page_data_is_refused_before_anything_is_served(
    chain: Chain, tmp_path: Path, where: str
) -> None:
    chain.pack(1, None, codec="none")
    path = chain.path(1)
    if where == "chunk header":  # a chunk's header is covered by the trailer digest
        flip(path, chunk_records(path, MiB)[2][0] + 9)
    elif where == "small section":  # pagemap-1.img, stored whole
        off, length = chunk_records(path)[0]
        assert length == F.CHUNK.size + 80
        flip(path, off + F.RECORD_HEADER.size + F.CHUNK.size + 1)
    elif where == "truncated":
        os.truncate(path, path.stat().st_size - 5000)
    else:
        flip(path, path.stat().st_size - 3)
    dest = tmp_path / "dest"
    with pytest.raises(CorruptImageError) as exc:
        prepare_image(path, dest, chain.path)
    assert str(path) in str(exc.value) and "offset" in str(exc.value)
    assert not dest.exists()  # nothing left behind


def test_a_missing_parent_is_refused_up_front_and_a_missing_chunk_stops_the_stream(
    chain: Chain, tmp_path: Path
) -> None:
    s1 = chain.pack(1, None)
    chain.pack(2, s1.index)
    # a parent that lacks what the child refers to: another image packed under the same ckptid
    chain.mem[:] = os.urandom(len(chain.mem))
    (chain.root / "other").mkdir()
    other = chain.root / "other" / "ckpt-1.hck"
    (chain.src / "pages-1.img").write_bytes(chain.mem)
    from hpcckpt.image import pack_dir
    from tests.pipeline.test_incremental import meta

    with open(other, "wb") as f:
        pack_dir(chain.src, f, meta(1), chunk_size=MiB)
    # The parent's index is built while the restore goes on: the first chunk it lacks ends the stream
    # (CRIU then fails before any restored task runs), not a byte of anything else is served.
    p = prepare_image(chain.path(2), tmp_path / "d1", lambda c: other)
    try:
        with pytest.raises(CorruptImageError, match="does not store the chunk") as exc:
            content(p, "pages-1.img")
        assert str(other) in str(exc.value)
    finally:
        p.close()
    chain.path(1).unlink()
    with pytest.raises(UnreadableImageError, match="missing"):
        prepare_image(chain.path(2), tmp_path / "d2", chain.path)
    assert not (tmp_path / "d2").exists()


# --- the image-streamer protocol, with a client that does what CRIU does ---------------------------


def request(name: str) -> bytes:
    """What criu sends for ``name``: an img_streamer_request_entry, length first."""
    body = pbcraft.fb(1, name.encode())
    return struct.pack("<I", len(body)) + body


class FakeCriu:
    """criu/img-streamer.c's side: connect, request a file, read the reply, hand over a pipe's write end."""

    def __init__(self, images_dir: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(images_dir / SOCKET_NAME))

    def open(self, name: str) -> int | None:
        self.sock.sendall(request(name))
        (n,) = struct.unpack("<I", self._exact(4))
        exists = self._exact(n) == b"\x08\x01"
        if not exists:
            return None
        r, w = os.pipe()
        socket.send_fds(self.sock, [b"\0"], [w])
        os.close(w)
        return r

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            assert part
            buf += part
        return buf

    def close(self) -> None:
        self.sock.close()


def read_all(fd: int) -> bytes:
    out = bytearray()
    while part := os.read(fd, 1 << 20):
        out += part
    os.close(fd)
    return bytes(out)


def test_protocol_messages_roundtrip() -> None:
    assert parse_request(request("pages-1.img")[4:]) == "pages-1.img"
    assert reply(True) == b"\x02\x00\x00\x00\x08\x01" and reply(False)[-1] == 0
    with pytest.raises(ValueError):
        parse_request(b"\x0a\x05ab")  # claims 5 bytes, has 2
    with pytest.raises(ValueError):
        parse_request(pbcraft.fv(2, 7))  # no file name


def test_streamer_serves_files_concurrently_and_says_what_is_missing(tmp_path: Path) -> None:
    files = {"inventory.img": b"inv" * 10, "pages-1.img": os.urandom(3 * MiB), "pages-2.img": os.urandom(MiB)}

    def source(name: str) -> Iterator[memoryview] | None:
        if name not in files:
            return None
        data = files[name]
        return (memoryview(data)[i : i + 65536] for i in range(0, len(data), 65536))

    s = ImageStreamer(tmp_path, source).start()
    criu = FakeCriu(tmp_path)
    assert criu.open("tty-info.img") is None
    # two pages files open at once and read interleaved, as two restored processes do
    a, b = criu.open("pages-1.img"), criu.open("pages-2.img")
    assert a is not None and b is not None
    got: dict[str, bytes] = {}
    ta = threading.Thread(target=lambda: got.__setitem__("a", read_all(a)))
    ta.start()
    got["b"] = read_all(b)
    ta.join()
    inv = criu.open("inventory.img")
    assert inv is not None and read_all(inv) == files["inventory.img"]
    criu.close()
    assert s.close() is None
    assert got == {"a": files["pages-1.img"], "b": files["pages-2.img"]}
    assert s.served == ["pages-1.img", "pages-2.img", "inventory.img"]
    assert not (tmp_path / SOCKET_NAME).exists()


def test_a_failing_source_closes_the_pipe_and_is_reported(tmp_path: Path) -> None:
    def source(name: str) -> Iterator[memoryview]:
        yield memoryview(b"good" * 1000)
        raise CorruptImageError("chunk checksum mismatch", path="/store/ckpt-9.hck", offset=4242)

    s = ImageStreamer(tmp_path, source).start()
    criu = FakeCriu(tmp_path)
    fd = criu.open("pages-1.img")
    assert fd is not None
    assert read_all(fd) == b"good" * 1000  # then EOF: criu fails on its short read
    criu.close()
    err = s.close()
    assert isinstance(err, CorruptImageError) and "offset 4242" in str(err)


def test_criu_that_never_connects_or_leaves_early(tmp_path: Path) -> None:
    s = ImageStreamer(tmp_path, lambda name: iter([memoryview(b"x" * (4 * MiB))])).start()
    assert s.close(timeout=5) is None  # criu failed before connecting: nothing to report
    s = ImageStreamer(tmp_path, lambda name: iter([memoryview(b"x" * (4 * MiB))])).start()
    criu = FakeCriu(tmp_path)
    fd = criu.open("pages-1.img")
    assert fd is not None
    os.read(fd, 100)
    os.close(fd)  # criu stops reading: a broken pipe is criu's business, not an error of ours
    criu.close()
    assert s.close(timeout=5) is None


def test_a_garbled_request_is_an_engine_error(tmp_path: Path) -> None:
    s = ImageStreamer(tmp_path, lambda name: None).start()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(tmp_path / SOCKET_NAME))
    c.sendall(struct.pack("<I", 3) + b"\x0a\x09a")
    c.close()
    err = s.close(timeout=5)
    assert isinstance(err, EngineError) and "malformed" in str(err)


def test_pages_of_several_processes_stream_at_once(chain: Chain, tmp_path: Path) -> None:
    """One pump thread per restored process, all decoding zstd at the same time (a shared zstd
    decoding context corrupts output: seen with a real process tree)."""
    for n in range(2, 7):
        (chain.src / f"pages-{n}.img").write_bytes(b"".join(os.urandom(4096) * 64 for _ in range(12)))
    chain.pack(1, None, codec="zstd")
    p = prepare_image(chain.path(1), tmp_path / "dest", chain.path)
    got: dict[str, bytes] = {}
    try:
        threads = [threading.Thread(target=lambda n=n: got.__setitem__(n, content(p, n)))
                   for n in sorted(p.deferred)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        p.close()
    assert sorted(got) == [f"pages-{n}.img" for n in range(1, 7)]
    for name, data in got.items():
        assert data == (chain.src / name).read_bytes()


# --- zero-copy: chunks read into the streamer's buffers and spliced into the pipe ---------------


class Chunks:
    """A ChunkReader of distinct chunks (each byte says which chunk it is): reused buffers show up."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.buffer_size = max(sizes)
        self.i = 0

    def read_into(self, memory: memoryview) -> memoryview | None:
        if self.i == len(self.sizes):
            return None
        n = self.sizes[self.i]
        memory[:n] = bytes([self.i % 251]) * n
        self.i += 1
        return memory[:n]

    def expected(self) -> bytes:
        return b"".join(bytes([i % 251]) * n for i, n in enumerate(self.sizes))

    def close(self) -> None:
        pass


def slow_read_all(fd: int, piece: int = 4096, every: int = 64) -> bytes:
    out = bytearray()
    while part := os.read(fd, piece):
        out += part
        if len(out) % (every * piece) == 0:
            time.sleep(0.001)  # CRIU is busy restoring: the streamer must not run ahead of it
    os.close(fd)
    return bytes(out)


@pytest.mark.parametrize("sizes", [[MiB] * 12, [64 << 10] * 200, [4096, 3 * MiB, 100, 64 << 10, MiB + 1] * 6])
def test_spliced_chunks_arrive_intact_however_slowly_criu_reads(tmp_path: Path, sizes: list[int]) -> None:
    from hpcckpt.criu import splice
    assert splice.AVAILABLE
    reader = Chunks(sizes)
    s = ImageStreamer(tmp_path, lambda name: reader).start()
    criu = FakeCriu(tmp_path)
    fd = criu.open("pages-1.img")
    assert fd is not None
    got = slow_read_all(fd)
    criu.close()
    assert s.close() is None
    assert got == reader.expected()  # a buffer refilled before its bytes were read would show here


def test_splice_helpers(tmp_path: Path) -> None:
    from hpcckpt.criu import splice
    r, w = os.pipe()
    buf = memoryview(bytearray(b"x" * 10000))
    assert splice.vmsplice_all(w, buf) == 10000 and splice.unread(w) == 10000
    os.read(r, 4000)
    splice.wait_consumed(w, 10000, 4000)  # returns at once: 4000 bytes were read
    os.close(r)
    with pytest.raises(BrokenPipeError):  # the reader left with 6000 bytes unread: never wait forever
        splice.wait_consumed(w, 10000, 10000)
    with pytest.raises(BrokenPipeError):
        splice.vmsplice_all(w, buf)
    os.close(w)


def test_section_reader_reads_into_the_callers_memory_page_aligned(chain: Chain, tmp_path: Path) -> None:
    import mmap

    chain.pack(1, None, codec="none")
    p = prepare_image(chain.path(1), tmp_path / "dest", chain.path)
    try:
        reader = p.open("pages-1.img")
        assert reader is not None and not isinstance(reader, Iterator)
        memory = memoryview(mmap.mmap(-1, reader.buffer_size))
        out = bytearray()
        while (view := reader.read_into(memory)) is not None:
            assert view.obj is memory.obj  # raw data lands in the caller's buffer: it can be spliced
            out += view
            del view
        assert bytes(out) == bytes(chain.mem)
    finally:
        p.close()


def test_a_failing_gate_gives_criu_nothing(tmp_path: Path) -> None:
    from hpcckpt.errors import IncompatibleError

    asked: list[str] = []

    def gate() -> None:
        raise IncompatibleError("this node's CPU lacks features the checkpointed job uses")

    def source(name: str) -> Iterator[memoryview]:
        asked.append(name)
        return iter([memoryview(b"inventory")])

    s = ImageStreamer(tmp_path, source, gate=gate).start()
    criu = FakeCriu(tmp_path)
    # Closed before any reply: criu fails. How criu sees it depends on timing: an end of stream, a reset,
    # or a broken pipe if the close came before its request went out.
    with pytest.raises((AssertionError, ConnectionError)):
        criu.open("inventory.img")
    criu.close()
    err = s.close()
    assert isinstance(err, IncompatibleError) and asked == []


def test_a_passing_gate_runs_once_before_the_first_answer(tmp_path: Path) -> None:
    order: list[str] = []

    def source(name: str) -> Iterator[memoryview]:
        order.append(name)
        return iter([memoryview(b"x")])

    s = ImageStreamer(tmp_path, source, gate=lambda: order.append("gate")).start()
    criu = FakeCriu(tmp_path)
    for name in ("inventory.img", "pstree.img"):
        fd = criu.open(name)
        assert fd is not None and read_all(fd) == b"x"
    criu.close()
    assert s.close() is None and order == ["gate", "inventory.img", "pstree.img"]


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_header_readahead_guesses_where_a_raw_sections_records_lie_and_nothing_for_a_compressed_one(
        tmp_path: Path, codec: str) -> None:
    from hpcckpt.image.model import ImageMeta
    from hpcckpt.image.pack import pack_dir
    from hpcckpt.image.readahead import HeaderReadahead

    src = tmp_path / "src"
    src.mkdir()
    (src / "core-1.img").write_bytes(os.urandom(3000))
    pages = os.urandom(MiB + 5000) if codec == "none" else bytes(range(256)) * ((MiB + 5000) // 256)
    (src / "pages-1.img").write_bytes(pages)  # 17 chunks of 64 KiB, the last one short
    (src / "pstree.img").write_bytes(b"x")
    image = tmp_path / "i.hck"
    with open(image, "wb") as f:
        pack_dir(src, f, ImageMeta(ckptid=0, job_id="j", engine="criu"), codec=codec, chunk_size=64 << 10)
    ahead = HeaderReadahead(image).start()
    ahead.join(10)
    data = image.read_bytes()
    ends, off = [], F.PREAMBLE.size
    while off < len(data):
        rtype, _, length, _ = F.RECORD_HEADER.unpack_from(data, off)
        if rtype == F.T_SECTION_END:
            ends.append(off)
        off += F.RECORD_HEADER.size + length
    if codec == "none":
        # The first chunk of pages-1.img shows the stride: the 16 others and its end are hinted from it.
        assert ahead.hinted == 16 and ahead.guessed == [ends[1]]
    else:  # compressed chunks vary in length: no guess, the walk reads the headers one after another
        assert ahead.hinted == 0 and ahead.guessed == []
    # Whatever it guessed, the checked walk reads the image as before.
    p = prepare_image(image, tmp_path / "d", None)
    try:
        assert content(p, "pages-1.img") == pages
    finally:
        p.close()
