"""The page-server side of CRIU's lazy-pages protocol, answered from a verified hpcckpt image.

``criu lazy-pages --page-server --ps-socket FD`` handles the restored
tasks' userfaultfds and asks a page server for every page a task touches
first, and then, in the background, for every page not yet touched, in
address order (criu/uffd.c). Here that page server is us, on one end of a
socket pair whose other end the daemon inherits as FD. The protocol
(criu/page-xfer.c, CRIU 4.2), with every message a ``struct
page_server_iov`` in native (little-endian x86-64) layout::

    u32 cmd, 4 bytes padding, u64 nr_pages, u64 vaddr, u64 dst_id   (32 bytes)

* the daemon sends ``PS_IOV_GET`` (nr_pages, vaddr, dst_id = the task's
  image id, its pid inside the job);
* we answer ``PS_IOV_ADD_F | PE_PRESENT << 16`` with the same vaddr and
  dst_id and a page count that may be smaller than asked (the daemon asks
  again for the rest), followed by that many pages of raw data;
* at the end the daemon sends ``PS_IOV_FORCE_CLOSE`` (it was given a
  socket, not an address) and waits for an ``int32`` status, 0.

A request we cannot answer (the pages' chunk fails its checks, the store is
gone) is never answered with data: :class:`PageServer` calls ``on_failure``
first (which kills the restored job, whose next touch of a missing page
would otherwise wait for ever or see garbage), then closes the socket, and
the daemon exits with an error.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from hpcckpt import log as hlog
from hpcckpt.errors import EngineError

_log = hlog.get("engine.pageserver")

PAGE = 4096
PSI = struct.Struct("<I4xQQQ")  # struct page_server_iov
_STATUS = struct.Struct("<i")
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
PE_PRESENT = 1 << 2
_CMD_BITS = 16
# The daemon never asks for more than MAX_XFER_LEN (4 MiB) at once; anything far larger is not CRIU.
MAX_REQUEST_PAGES = 1 << 16
_IOV_MAX = 512  # buffers per sendmsg, well below the kernel's UIO_MAXIOV (small chunks give many pieces)


class PageSource(Protocol):
    """Where the pages come from: checked before they are returned."""

    def pages(self, pid: int, vaddr: int, nr_pages: int) -> Sequence[memoryview]:
        """Up to ``nr_pages`` pages of task ``pid`` from ``vaddr`` on (at least one), checked, in pieces.

        Raises an :class:`~hpcckpt.errors.HpcckptError` (or OSError) when they
        cannot be given: unknown address, a chunk that fails its checks, an
        unreadable store.
        """
        ...


class PageServer:
    """Answers one ``criu lazy-pages`` daemon on ``sock`` from ``source``, on a thread of its own."""

    def __init__(self, sock: socket.socket, source: PageSource,
                 on_failure: Callable[[BaseException], None]) -> None:
        self.sock = sock
        self.source = source
        self.on_failure = on_failure
        self.error: BaseException | None = None
        self.requests = 0
        self.bytes = 0
        self.closed_by_criu = False
        self.source_s = 0.0  # time spent getting pages (reading and checking chunks), and sending them
        self.send_s = 0.0
        self._msg = memoryview(bytearray(PSI.size))
        self._thread = threading.Thread(target=self._serve, name="hpcckpt-pageserver", daemon=True)

    def start(self) -> PageServer:
        self._thread.start()
        return self

    def _recv(self) -> memoryview | None:
        # One recv per request (MSG_WAITALL), into one buffer: a request costs a syscall, not several.
        got = 0
        while got < PSI.size:
            n = self.sock.recv_into(self._msg[got:], PSI.size - got, socket.MSG_WAITALL)
            if not n:
                if got:
                    raise EngineError("criu lazy-pages closed the page-server socket in the middle of a request")
                return None
            got += n
        return self._msg

    def _serve(self) -> None:
        try:
            while (msg := self._recv()) is not None:
                cmd, nr, vaddr, dst = PSI.unpack(msg)
                if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                    self.sock.sendall(_STATUS.pack(0))
                    self.closed_by_criu = True
                    return
                if cmd & 0xFFFF != PS_IOV_GET or not 0 < nr <= MAX_REQUEST_PAGES or vaddr % PAGE:
                    raise EngineError(f"unexpected page-server request from criu lazy-pages: cmd {cmd:#x}, "
                                      f"{nr} pages at {vaddr:#x}")
                t0 = time.perf_counter()
                data = self.source.pages(dst, vaddr, nr)
                t1 = time.perf_counter()
                size = sum(v.nbytes for v in data)
                n = size // PAGE
                if not 0 < n <= nr or size != n * PAGE:
                    raise EngineError(f"page source gave {size} bytes for {nr} pages at {vaddr:#x}")
                self._send([memoryview(PSI.pack(PS_IOV_ADD_F | PE_PRESENT << _CMD_BITS, n, vaddr, dst)), *data])
                self.source_s += t1 - t0
                self.send_s += time.perf_counter() - t1
                self.requests += 1
                self.bytes += size
        except BaseException as exc:  # every failure must stop the job before the daemon sees EOF
            self.error = exc
            try:
                self.on_failure(exc)
            finally:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    def _send(self, parts: list[memoryview]) -> None:
        """The answer's header and pages in one sendmsg (the socket's buffer holds a whole answer), and
        more calls only for what did not fit."""
        while parts:
            sent = self.sock.sendmsg(parts[:_IOV_MAX])
            while parts and sent >= parts[0].nbytes:
                sent -= parts[0].nbytes
                parts.pop(0)
            if parts and sent:
                parts[0] = parts[0][sent:]

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self.sock.close()
