"""CRIU's image-streamer protocol, served from Python: ``criu restore --stream`` reads its images from us.

With ``--stream``, CRIU opens no image file itself. It connects to
``IMAGES_DIR/streamer-serve.sock`` and, for each image it wants, sends an
``img_streamer_request_entry`` (the file name); we answer with an
``img_streamer_reply_entry`` (whether it exists), and if it does CRIU sends
the write end of a fresh pipe (SCM_RIGHTS, with one dummy byte) and reads
the file from the read end. Messages are protobuf, each preceded by its
length as a little-endian u32 (CRIU's ``pb_write_one`` without a magic).
See criu/img-streamer.c and images/img-streamer.proto in CRIU's source.

CRIU may read several files at once (one per restored process), and reads a
file only as fast as it restores it, so each file is pumped into its pipe
on a thread of its own. A file's content comes from a ``source`` callable
(name -> iterator of buffers, or None when there is no such file); an error
raised by the iterator (a chunk that fails its checks) closes that pipe, so
CRIU fails the restore, and is reported by :meth:`ImageStreamer.close`.
A ``gate`` runs once CRIU has connected and before it is answered at all:
the last checks of a restore overlap CRIU's start-up, and if one fails,
CRIU is given nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from hpcckpt import log as hlog
from hpcckpt.criu import splice
from hpcckpt.criu.images import string_field
from hpcckpt.errors import EngineError

_log = hlog.get("engine.streamer")

SOCKET_NAME = "streamer-serve.sock"
_LEN = struct.Struct("<I")
_MAX_REQUEST = 64 << 10  # a file name, protobuf-wrapped
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# The default pipe-max-size. Measured streaming 1 GiB into criu restore: 64 KiB pipes 2.0 s, 256 KiB
# 1.15 s, 1 MiB 0.87 s, but 2, 4 and 8 MiB (root may go past the maximum) 2.0-2.2 s.
_PIPE_SIZE = 1 << 20
_POLL = 0.2


@runtime_checkable
class ChunkReader(Protocol):
    """A file served as chunks read into the streamer's own buffers, so they can be spliced, not copied."""

    buffer_size: int  # the most one chunk needs

    def read_into(self, memory: memoryview) -> memoryview | None:
        """The next chunk (a view of ``memory``, or of other memory), None after the last."""
        ...

    def close(self) -> None: ...


Content = Iterator[memoryview] | ChunkReader
Source = Callable[[str], Content | None]
# Buffers per spliced file: one being read while CRIU consumes the pipe (one chunk) from the others.
_RING = 3


def parse_request(msg: bytes) -> str:
    """The file name of an ``img_streamer_request_entry`` (``required string filename = 1``)."""
    name = string_field(msg, 1)
    if name is None:
        raise ValueError("request without a file name")
    return name


def reply(exists: bool) -> bytes:
    """An ``img_streamer_reply_entry`` (``required bool exists = 1``), length-prefixed."""
    body = b"\x08" + (b"\x01" if exists else b"\x00")
    return _LEN.pack(len(body)) + body


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            if buf:
                raise EngineError("criu closed the image-streamer socket in the middle of a request")
            return None
        buf += part
    return bytes(buf)


class ImageStreamer:
    """Serves ``source`` to one ``criu restore --stream -D images_dir``; start before CRIU, close after."""

    def __init__(self, images_dir: Path, source: Source, gate: Callable[[], None] | None = None) -> None:
        self.images_dir = images_dir
        self.source = source
        self.gate = gate
        self.path = images_dir / SOCKET_NAME
        self._stop = threading.Event()
        self._pumps: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.served: list[str] = []
        self.bytes = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._sock.bind(os.fspath(self.path))
            os.chmod(self.path, 0o600)
            self._sock.listen(1)
            self._sock.settimeout(_POLL)
        except OSError as exc:
            self._sock.close()
            raise EngineError(f"{self.path}: cannot create the image-streamer socket: {exc.strerror}") from exc
        self._thread = threading.Thread(target=self._serve, name="hpcckpt-streamer", daemon=True)

    def start(self) -> ImageStreamer:
        self._thread.start()
        return self

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(None)
                    if self.gate is not None:
                        self.gate()  # raising closes the connection unanswered: criu fails
                    self._session(conn)
                return  # one criu, one connection
        except BaseException as exc:  # reported by close(); criu sees the socket go
            self._fail(exc)

    def _session(self, conn: socket.socket) -> None:
        while True:
            head = _recv_exact(conn, _LEN.size)
            if head is None:
                return  # criu is done with the streamer (img_streamer_finish) or gone
            (n,) = _LEN.unpack(head)
            if n > _MAX_REQUEST:
                raise EngineError(f"criu sent an image-streamer request of {n} bytes")
            msg = _recv_exact(conn, n)
            if msg is None:
                return
            try:
                name = parse_request(msg)
            except ValueError as exc:
                raise EngineError(f"malformed image-streamer request from criu: {exc}") from exc
            content = self.source(name)
            conn.sendall(reply(content is not None))
            if content is None:
                continue
            try:
                _, fds, _, _ = socket.recv_fds(conn, 1, 1, socket.MSG_CMSG_CLOEXEC)
            except OSError:
                _close_source(content)
                raise
            if len(fds) != 1:
                _close_source(content)
                for fd in fds:
                    os.close(fd)
                raise EngineError(f"criu sent no pipe for {name}")
            self.served.append(name)
            t = threading.Thread(target=self._pump, args=(name, content, fds[0]), name=f"hpcckpt-pump-{name}",
                                 daemon=True)
            self._pumps.append(t)
            t.start()

    def _pump(self, name: str, content: Content, fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        sent = [0]
        try:
            if isinstance(content, ChunkReader):
                _pump_chunks(content, fd, sent)
            else:
                for view in content:
                    sent[0] += _write_all(fd, view)
        except BrokenPipeError:
            # criu stopped reading: it failed (its exit status says so) or needed no more
            hlog.event(_log, "streamer.closed_early", f"criu closed {name} after {sent[0]} bytes", 10)
        except BaseException as exc:
            self._fail(exc)
        finally:
            os.close(fd)
            _close_source(content)
            with self._lock:
                self.bytes += sent[0]

    def close(self, timeout: float = 30) -> BaseException | None:
        """Stop serving and wait for the pumps; the first error a source or the protocol raised, if any."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        for t in self._pumps:
            t.join(timeout)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with self._lock:
            return self._errors[0] if self._errors else None


def _write_all(fd: int, view: memoryview) -> int:
    n = view.nbytes
    while view.nbytes:
        view = view[os.write(fd, view):]
    return n


def _pump_chunks(reader: ChunkReader, fd: int, sent: list[int]) -> None:
    """Chunks read into a ring of our buffers and spliced into the pipe; a buffer is refilled only once
    CRIU has read what was spliced from it (see :mod:`hpcckpt.criu.splice`)."""
    # Anonymous mappings: unmapping one whose pages the pipe still holds is safe (they are counted).
    ring = [memoryview(mmap.mmap(-1, max(reader.buffer_size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
            for _ in range(_RING)]
    ends = [0] * _RING  # stream position just after what was last spliced from each buffer
    for i in itertools.count():
        k = i % _RING
        if splice.AVAILABLE:
            splice.wait_consumed(fd, sent[0], ends[k])
        view = reader.read_into(ring[k])
        if view is None:
            return
        if splice.AVAILABLE and view.obj is ring[k].obj:
            sent[0] += splice.vmsplice_all(fd, view)
        else:  # decoded into memory of its own: written (copied) like any other data
            sent[0] += _write_all(fd, view)
        ends[k] = sent[0]
        del view


def _close_source(content: Content) -> None:
    close = getattr(content, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()
