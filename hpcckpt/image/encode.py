"""Chunk encoding for pack: hash, reference or compress, in order, optionally on several threads.

zstandard and lz4 release the GIL while they compress, so a small thread pool
turns spare cores into throughput. Records must still leave in chunk order
(the format is sequential), so results queue in a bounded window of
``depth`` chunks: memory stays at about ``2 * depth * chunk_size`` bytes,
whatever the image size.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from hpcckpt.image import format as F
from hpcckpt.image.codec import Adaptive, Compressor

Stored = bytes | memoryview


@dataclass
class Encoded:
    """One chunk, ready to write: a CHUNK (codec, stored) or a CHUNK_REF (ref_ckptid)."""

    offset: int
    raw_len: int
    digest: bytes
    buf: bytearray  # returned to the pool once written
    codec: int = F.C_NONE
    stored: Stored = b""
    ref_ckptid: int = 0
    tried: bool = False  # compression was attempted (adaptive bookkeeping)


class ChunkEncoder:
    """Compresses chunks inline (workers=1) or on a thread pool, handing them back in order."""

    def __init__(self, codec: str, level: int, chunk_size: int, workers: int,
                 write: Callable[[Encoded], None]) -> None:
        self.codec = codec
        self.level = level
        self.workers = max(1, workers)
        self.depth = 2 * self.workers if self.workers > 1 else 1
        self._write = write
        self._free = [bytearray(chunk_size) for _ in range(self.depth + 1)]
        self._pending: deque[Future[Encoded] | Encoded] = deque()
        self._local = threading.local()
        self._inline = Compressor(codec, level)  # also validates the codec name
        self._pool = ThreadPoolExecutor(self.workers, "hpcckpt-compress") if self.workers > 1 else None
        self.adaptive = Adaptive()

    def buffer(self) -> bytearray:
        """A free chunk buffer (waits for the oldest chunk to be written when none is free)."""
        while not self._free:
            self._retire_one()
        return self._free.pop()

    def _compressor(self) -> Compressor:
        comp: Compressor | None = getattr(self._local, "comp", None)
        if comp is None:
            comp = self._local.comp = Compressor(self.codec, self.level)
        return comp

    def _compress(self, item: Encoded) -> Encoded:
        item.codec, item.stored = self._compressor().compress(memoryview(item.buf)[: item.raw_len])
        return item

    def submit(self, item: Encoded) -> None:
        """Queue a chunk; a ref or a chunk the adaptive rule skips is passed through as is."""
        if not item.ref_ckptid:
            if self._inline.codec_id != F.C_NONE and self.adaptive.should_try():
                item.tried = True
                if self._pool is None:
                    item.codec, item.stored = self._inline.compress(memoryview(item.buf)[: item.raw_len])
                else:
                    self._pending.append(self._pool.submit(self._compress, item))
                    self._drain(self.depth)
                    return
            else:
                item.stored = memoryview(item.buf)[: item.raw_len]
        self._pending.append(item)
        self._drain(self.depth)

    def _retire_one(self) -> None:
        head = self._pending.popleft()
        item = head.result() if isinstance(head, Future) else head
        if item.tried:
            self.adaptive.outcome(item.codec != F.C_NONE)
        self._write(item)
        item.stored = b""
        self._free.append(item.buf)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._retire_one()

    def flush(self) -> None:
        """Write everything queued (at a section's end)."""
        self._drain(0)

    def close(self) -> None:
        if self._pool is not None:
            # pending futures are abandoned on error; waiting keeps buffers from being reused under them
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
