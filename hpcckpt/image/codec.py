"""Chunk compression: zstd or lz4, with output sizes bounded before decoding.

Decoders never trust sizes found inside compressed data: the chunk record's
raw length (already checked against MAX_CHUNK) is the only size used, and a
zstd frame that declares another size is refused before it is decoded.
"""

from __future__ import annotations

import threading

import lz4.block
import zstandard

from hpcckpt.image import format as F

# A chunk that compresses by less than this is stored raw: decoding it would
# cost more time on restore than the few bytes save on the filesystem.
MIN_SAVING = 1 / 32


class CodecError(ValueError):
    """Stored bytes do not decode to the declared raw length (reader adds the location)."""


# Adaptive compression: after this many incompressible chunks in a row a
# section (already-compressed or random data) is stored raw, trying again only
# every REPROBE_EVERY chunks in case the data changes character.
GIVE_UP_AFTER = 4
REPROBE_EVERY = 16


class Adaptive:
    """Per-section give-up state; decisions are made and updated in chunk order."""

    def __init__(self) -> None:
        self.misses = 0
        self.skip = 0
        self.skipped = 0  # chunks not even tried, for the pack statistics

    def new_section(self) -> None:
        self.misses = 0
        self.skip = 0

    def should_try(self) -> bool:
        if self.skip:
            self.skip -= 1
            self.skipped += 1
            return False
        return True

    def outcome(self, compressed: bool) -> None:
        if compressed:
            self.misses = 0
            return
        self.misses += 1
        if self.misses >= GIVE_UP_AFTER:
            self.misses = GIVE_UP_AFTER - 1  # one more miss after a re-probe gives up again at once
            self.skip = REPROBE_EVERY


class Compressor:
    """Compresses chunks with one codec; keeps its zstd context between chunks.

    Not thread-safe (the zstd context): parallel packing gives each worker its own.
    """

    def __init__(self, codec: str, level: int = 3) -> None:
        if codec not in F.CODEC_IDS:
            raise ValueError(f"unknown codec {codec!r}; use one of {sorted(F.CODEC_IDS)}")
        self.codec_id = F.CODEC_IDS[codec]
        self.level = level
        self._zstd = (
            zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
            if self.codec_id == F.C_ZSTD
            else None
        )

    def compress(self, raw: memoryview) -> tuple[int, bytes | memoryview]:
        """(codec id, stored bytes): raw itself when compression does not pay."""
        if self.codec_id == F.C_NONE or not raw.nbytes:
            return F.C_NONE, raw
        if self._zstd is not None:
            out = self._zstd.compress(raw)
        else:
            # lz4 block format: the raw length lives in our chunk record, not in the block
            out = lz4.block.compress(raw, mode="default", store_size=False)
        if len(out) > raw.nbytes * (1 - MIN_SAVING):
            return F.C_NONE, raw
        return self.codec_id, out


# A ZstdDecompressor holds one decoding context and must not be used by two threads at once; a
# streamed restore decodes on one thread per restored process.
_local = threading.local()


def _zstd_d() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "zstd_d", None)
    if d is None:
        d = _local.zstd_d = zstandard.ZstdDecompressor()
    return d


def decompress(codec_id: int, stored: memoryview, raw_len: int) -> bytes | memoryview:
    """The chunk's raw bytes, exactly raw_len of them, or CodecError."""
    if codec_id == F.C_NONE:
        if stored.nbytes != raw_len:
            raise CodecError(f"raw chunk holds {stored.nbytes} bytes, record says {raw_len}")
        return stored
    if stored.nbytes > F.MAX_PAYLOAD:
        raise CodecError("compressed chunk larger than any chunk may be")
    try:
        if codec_id == F.C_ZSTD:
            declared = zstandard.frame_content_size(stored)
            if declared != raw_len:
                raise CodecError(f"zstd frame declares {declared} bytes, record says {raw_len}")
            out = _zstd_d().decompress(stored, max_output_size=raw_len)
        elif codec_id == F.C_LZ4:
            out = lz4.block.decompress(stored, uncompressed_size=raw_len)
        else:
            raise CodecError(f"unknown codec {codec_id}")
    except (zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
        raise CodecError(f"{F.CODEC_NAMES[codec_id]} data does not decode: {exc}") from exc
    if len(out) != raw_len:
        raise CodecError(f"chunk decodes to {len(out)} bytes, record says {raw_len}")
    return out
