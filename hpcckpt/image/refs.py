"""What an incremental image refers to: chunks of earlier images, by content hash.

Plain data, below the parent-image reader (:mod:`hpcckpt.image.parent`) and
the image model that carries an index, so that neither needs the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ckptid -> path of that checkpoint's image (the catalog's answer, or a test's).
ResolveParent = Callable[[int], Path]

ChunkKey = tuple[bytes, int]  # (xxh3_128 digest, raw length)


@dataclass(frozen=True)
class ChunkLocation:
    """Where a chunk's bytes are stored: a CHUNK record of image ``ckptid``."""

    ckptid: int
    section: str
    offset: int  # in the section's file
    length: int


@dataclass
class ParentIndex:
    """What a new image may reference instead of storing: hash -> location.

    ``depth``, ``base``, ``base_bytes`` and ``chain_bytes`` describe the chain
    ending with this image, for chain bounding (:mod:`hpcckpt.core.pipeline.chain`).
    """

    ckptid: int
    job_id: str = ""
    uid: int = 0
    depth: int = 0  # 0: a full image
    base: int = 0  # ckptid of the chain's full image
    base_bytes: int = 0
    chain_bytes: int = 0  # image bytes from the base to this image, both included
    chunks: dict[ChunkKey, ChunkLocation] = field(default_factory=dict)

    def lookup(self, digest: bytes, length: int) -> ChunkLocation | None:
        return self.chunks.get((digest, length))

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def ckptids(self) -> frozenset[int]:
        """Every image a ref made through this index may name."""
        return frozenset(loc.ckptid for loc in self.chunks.values())

    def chain_extra(self) -> dict[str, Any]:
        """``meta.extra["chain"]`` for a child image packed against this index."""
        return {
            "depth": self.depth + 1,
            "base": self.base,
            "base_bytes": self.base_bytes,
            "bytes_before": self.chain_bytes,
            "depends_on": sorted(self.ckptids),
        }
