"""Lazy restore's pieces without CRIU: the page-server protocol, the pagemap reader, random checked reads.

The protocol side is driven from a client that does what criu/uffd.c and
criu/page-xfer.c do (PS_IOV_GET, then PS_IOV_FORCE_CLOSE and an int32
status). Real ``criu restore --lazy-pages`` runs in tests/criu/test_lazy_restore.py.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from hpcckpt.core.lazyrestore import lazy_unavailable, wants_lazy
from hpcckpt.criu.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, lazy_ranges, read_pagemaps
from hpcckpt.criu.pageserver import PS_IOV_ADD_F, PS_IOV_FORCE_CLOSE, PS_IOV_GET, PSI, PageServer
from hpcckpt.errors import EngineError
from hpcckpt.image import format as F
from hpcckpt.image.errors import CorruptImageError, UnsupportedImageError
from hpcckpt.image.lazy import LazyPages
from hpcckpt.image.stream import prepare_image
from tests.pipeline.test_incremental import Chain
from tests.pipeline.test_stream import chunk_records, flip
from tests.security.pbcraft import fv, image

MiB = 1 << 20
PAGE = 4096
PAGEMAP_MAGIC = 0x56084025


class Pages:
    """A page source over one bytes object: pid 7's pages start at address 0x10000."""

    def __init__(self, data: bytes, fail_at: int | None = None, most: int = 1 << 30) -> None:
        self.data, self.fail_at, self.most = data, fail_at, most

    def pages(self, pid: int, vaddr: int, nr_pages: int) -> Sequence[memoryview]:
        if pid != 7 or (self.fail_at is not None and vaddr == self.fail_at):
            raise CorruptImageError("chunk content hash mismatch")
        off = vaddr - 0x10000
        n = min(nr_pages, self.most)
        half = n // 2 * PAGE
        view = memoryview(self.data)
        return [view[off : off + half], view[off + half : off + n * PAGE]]


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            raise EOFError
        buf += part
    return buf


def serve(source: Pages) -> tuple[socket.socket, PageServer, list[BaseException]]:
    ours, daemon = socket.socketpair()
    failures: list[BaseException] = []
    return daemon, PageServer(ours, source, on_failure=failures.append).start(), failures


def test_pages_are_answered_as_criu_asks_and_close_gets_a_status() -> None:
    data = os.urandom(64 * PAGE)
    daemon, server, failures = serve(Pages(data, most=5))
    try:
        daemon.sendall(PSI.pack(PS_IOV_GET, 8, 0x10000 + 2 * PAGE, 7))
        cmd, nr, vaddr, dst = PSI.unpack(recv_exact(daemon, PSI.size))
        # fewer pages than asked is allowed: the daemon asks again for the rest
        assert (cmd & 0xFFFF, cmd >> 16, nr, vaddr, dst) == (PS_IOV_ADD_F, PE_PRESENT, 5, 0x10000 + 2 * PAGE, 7)
        assert recv_exact(daemon, 5 * PAGE) == data[2 * PAGE : 7 * PAGE]
        daemon.sendall(PSI.pack(PS_IOV_FORCE_CLOSE, 0, 0, 0))
        assert struct.unpack("<i", recv_exact(daemon, 4)) == (0,)
        server.join(5)
        assert server.closed_by_criu and server.error is None and not failures
        assert (server.requests, server.bytes) == (1, 5 * PAGE)
    finally:
        server.close()
        daemon.close()


def test_a_page_that_fails_its_check_is_never_sent_and_the_failure_is_reported_first() -> None:
    data = os.urandom(16 * PAGE)
    daemon, server, failures = serve(Pages(data, fail_at=0x10000 + 4 * PAGE))
    try:
        daemon.sendall(PSI.pack(PS_IOV_GET, 1, 0x10000, 7))
        recv_exact(daemon, PSI.size + PAGE)
        daemon.sendall(PSI.pack(PS_IOV_GET, 1, 0x10000 + 4 * PAGE, 7))
        assert daemon.recv(1) == b""  # closed, no header, no data
        server.join(5)
        assert len(failures) == 1 and isinstance(failures[0], CorruptImageError)
        assert server.error is failures[0]
    finally:
        server.close()
        daemon.close()


@pytest.mark.parametrize("msg", [PSI.pack(99, 1, 0, 7), PSI.pack(PS_IOV_GET, 0, 0x10000, 7),
                                 PSI.pack(PS_IOV_GET, 1, 0x10001, 7), PSI.pack(PS_IOV_GET, 1 << 20, 0x10000, 7)])
def test_requests_criu_never_sends_are_refused(msg: bytes) -> None:
    daemon, server, failures = serve(Pages(os.urandom(4 * PAGE)))
    try:
        daemon.sendall(msg)
        assert daemon.recv(1) == b""
        server.join(5)
        assert isinstance(server.error, EngineError) and failures == [server.error]
    finally:
        server.close()
        daemon.close()


def pagemap(pages_id: int, entries: list[tuple[int, int, int]]) -> bytes:
    body = [fv(1, pages_id)] + [fv(1, va) + fv(2, n) + fv(4, flags) for va, n, flags in entries]
    return image(PAGEMAP_MAGIC, body)


def test_pagemaps_say_where_each_address_lies_and_which_runs_are_lazy(tmp_path: Path) -> None:
    (tmp_path / "pagemap-1.img").write_bytes(pagemap(3, [
        (0x400000, 2, PE_PRESENT),  # a file's private pages: restored by criu itself
        (0x600000, 4, PE_PRESENT | PE_LAZY),
        (0x604000, 4, PE_PRESENT | PE_LAZY),  # contiguous: merged
        (0x700000, 1, PE_LAZY),  # not present (zero page): no bytes in the file
        (0x7FF000, 1, PE_PRESENT),  # the stack
    ]))
    (tmp_path / "pagemap-shmem-9.img").write_bytes(b"not a task's pagemap")
    tasks = read_pagemaps(tmp_path)
    assert list(tasks) == [1]
    t = tasks[1]
    assert t.pages_file == "pages-3.img" and t.lazy_bytes == 8 * PAGE
    assert t.locate(0x600000, 100) == (2 * PAGE, 8)
    assert t.locate(0x605000, 2) == (7 * PAGE, 2)
    assert t.locate(0x7FF000, 1) == (10 * PAGE, 1)
    with pytest.raises(CorruptImageError):
        t.locate(0x700000, 1)
    assert lazy_ranges(tasks) == {"pages-3.img": [(2 * PAGE, 8 * PAGE)]}


def test_pages_in_a_criu_parent_are_refused(tmp_path: Path) -> None:
    (tmp_path / "pagemap-1.img").write_bytes(pagemap(1, [(0x600000, 4, PE_PARENT | PE_LAZY)]))
    with pytest.raises(UnsupportedImageError):
        read_pagemaps(tmp_path)


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return Chain(tmp_path)


def test_random_reads_and_the_sparse_pages_file(chain: Chain, tmp_path: Path) -> None:
    s1 = chain.pack(1, None, codec="zstd")
    chain.mem[5 * MiB : 5 * MiB + 100] = os.urandom(100)
    chain.pack(2, s1.index, codec="zstd")  # most chunks are references into image 1
    p = prepare_image(chain.path(2), tmp_path / "dest", chain.path)
    pages = LazyPages(p)
    try:
        mem = bytes(chain.mem)
        for off, n in ((7 * MiB + 4096, 8192), (MiB - 4096, 3 * 4096), (0, 4096), (5 * MiB, MiB)):
            assert b"".join(pages.read("pages-1.img", off, n)) == mem[off : off + n]
        written = pages.materialize({"pages-1.img": [(MiB, 6 * MiB)]})  # 1..7 MiB lazy, the rest written
        assert written == 2 * MiB
        out = tmp_path / "dest" / "pages-1.img"
        got = out.read_bytes()
        assert got[:MiB] == mem[:MiB] and got[7 * MiB :] == mem[7 * MiB :] and got[MiB : 7 * MiB] == bytes(6 * MiB)
        assert out.stat().st_blocks * 512 <= 3 * MiB, "the lazy range takes room"
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        pages.start_prefetch()
        assert b"".join(pages.read("pages-1.img", 3 * MiB, 2 * MiB)) == mem[3 * MiB : 5 * MiB]
    finally:
        pages.close()
        p.close()


def test_a_bad_chunk_fails_the_read_and_tells_on_failure_once(chain: Chain, tmp_path: Path) -> None:
    chain.pack(1, None, codec="none")
    off, _ = chunk_records(chain.path(1), MiB)[3]
    flip(chain.path(1), off + F.RECORD_HEADER.size + F.CHUNK.size + 1000)
    p = prepare_image(chain.path(1), tmp_path / "dest", chain.path)
    failures: list[BaseException] = []
    done = threading.Event()

    def failed(exc: BaseException) -> None:
        failures.append(exc)
        done.set()

    pages = LazyPages(p, on_failure=failed)
    try:
        assert b"".join(pages.read("pages-1.img", 0, MiB)) == bytes(chain.mem[:MiB])
        pages.start_prefetch()  # reaches the bad chunk in image order, with nobody asking for it
        assert done.wait(10)
        with pytest.raises(CorruptImageError):
            pages.read("pages-1.img", 0, 4096)  # nothing is served once the image failed
        assert len(failures) == 1 and f"offset {off}" in str(failures[0])
    finally:
        pages.close()
        p.close()


def test_policy_and_node_decide() -> None:
    assert wants_lazy("on", 1 << 30, 1) and not wants_lazy("off", 0, 1 << 40)
    assert wants_lazy("auto", 1 << 30, 1 << 30) and not wants_lazy("auto", 1 << 30, (1 << 30) - 1)
    from hpcckpt.criu.engine import Criu

    assert lazy_unavailable(object(), euid=0) is not None
    assert lazy_unavailable(Criu("/bin/true"), euid=0) is None


def test_unprivileged_needs_the_sysctl(tmp_path: Path) -> None:
    from hpcckpt.criu.engine import Criu

    sysctl = tmp_path / "unprivileged_userfaultfd"
    sysctl.write_text("0\n")
    why = lazy_unavailable(Criu("/bin/true"), euid=1000, sysctl=sysctl)
    assert why is not None and "userfaultfd" in why
    sysctl.write_text("1\n")
    assert lazy_unavailable(Criu("/bin/true"), euid=1000, sysctl=sysctl) is None


def test_the_chunks_warmed_are_checked_first_wherever_they_lie(chain: Chain, tmp_path: Path) -> None:
    from hpcckpt.image.lazy import HOT_LIMIT

    chain.pack(1, None, codec="none")
    records = chunk_records(chain.path(1), MiB)
    off, _ = records[-1]
    flip(chain.path(1), off + F.RECORD_HEADER.size + F.CHUNK.size + 1000)  # the last chunk of the pages
    p = prepare_image(chain.path(1), tmp_path / "dest", chain.path)
    done = threading.Event()
    pages = LazyPages(p, on_failure=lambda exc: done.set())
    try:
        last = pages.chunk_index("pages-1.img", pages.sections["pages-1.img"].size - 1)
        assert pages.chunk_end(last) == pages.sections["pages-1.img"].size
        assert pages.warm(range(2 * HOT_LIMIT, -1, -1)) == list(range(HOT_LIMIT + 1, 2 * HOT_LIMIT + 1))
        assert pages.warm([last, 0]) == [0, last]  # the first HOT_LIMIT named, in image order
        pages.start_prefetch()
        assert done.wait(10)
        # In image order the bad chunk comes last: found after chunk 0 only, not after all the others.
        assert pages.prefetched == 1 and last > 2
    finally:
        pages.close()
        p.close()
