"""Incremental images: refs to what a parent stores, chains, and verify/unpack across them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from hpcckpt.image import ImageMeta, PackStats, pack_dir, unpack_image, verify_image
from hpcckpt.image import format as F
from hpcckpt.image.codec import GIVE_UP_AFTER, Adaptive
from hpcckpt.image.errors import CorruptImageError, UnreadableImageError, UnsupportedImageError
from hpcckpt.image.parent import index_image
from hpcckpt.image.refs import ParentIndex
from tests.pipeline.conftest import memory

MiB = 1 << 20


def meta(ckptid: int, uid: int = 1000) -> ImageMeta:
    return ImageMeta(ckptid=ckptid, job_id="9", engine="criu", uid=uid, user="alice", created=1.0)


class Chain:
    """Images ckpt-N.hck in one directory, packed from a changing 'dump' directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "dump"
        self.src.mkdir()
        self.mem = memory(8 * MiB)

    def path(self, ckptid: int) -> Path:
        return self.root / f"ckpt-{ckptid}.hck"

    def pack(self, ckptid: int, parent: ParentIndex | None, codec: str = "zstd", workers: int = 1) -> PackStats:
        (self.src / "pages-1.img").write_bytes(self.mem)
        (self.src / "pagemap-1.img").write_bytes(b"pm" * 40)
        with open(self.path(ckptid), "wb") as f:
            return pack_dir(self.src, f, meta(ckptid), codec=codec, chunk_size=MiB, parent=parent,
                            workers=workers)


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return Chain(tmp_path)


def test_unchanged_chunks_become_refs_and_unpack_is_byte_identical(chain: Chain, tmp_path: Path) -> None:
    s1 = chain.pack(1, None)
    chain.mem[3 * MiB : 3 * MiB + 4096] = os.urandom(4096)  # one chunk of eight changes
    s2 = chain.pack(2, s1.index)
    assert (s2.refs, s2.ref_bytes) == (7, 7 * MiB)
    assert s2.bytes_out < s1.bytes_out / 6
    chain.mem[0:10] = b"x" * 10  # the third image refers to both earlier ones
    s3 = chain.pack(3, s2.index)
    summary = verify_image(chain.path(3), chain.path)
    assert summary.parents == [1, 2] and summary.parents_verified and summary.ref_bytes == 7 * MiB
    assert summary.meta.parent_ckptid == 2 and summary.meta.extra["chain"]["depth"] == 2
    out = tmp_path / "out"
    unpack_image(chain.path(3), out, chain.path)
    assert (out / "pages-1.img").read_bytes() == bytes(chain.mem)
    assert (out / "pagemap-1.img").read_bytes() == b"pm" * 40
    assert s3.index is not None and s3.index.depth == 2
    assert s3.index.chain_bytes == s1.bytes_out + s2.bytes_out + s3.bytes_out


def test_index_from_image_matches_the_writers_own(chain: Chain) -> None:
    s1 = chain.pack(1, None)
    chain.mem[:MiB] = memory(MiB, seed=5)
    s2 = chain.pack(2, s1.index)
    read = index_image(chain.path(2))
    assert s2.index is not None
    assert read.chunks == s2.index.chunks and len(read) == 8
    assert (read.depth, read.base, read.base_bytes, read.chain_bytes) == (
        1, 1, s1.bytes_out, s1.bytes_out + s2.bytes_out)
    # one hop: a chunk the second image took from the first is indexed as stored in the first
    assert sorted(read.ckptids) == [1, 2]


def test_small_files_are_always_stored_whole(chain: Chain) -> None:
    s1 = chain.pack(1, None)
    s2 = chain.pack(2, s1.index)
    assert s2.refs == 8  # the eight 1 MiB chunks of pages, never the 80-byte pagemap
    assert s2.index is not None and all(k[1] >= F.MIN_REF for k in s2.index.chunks)


def test_corrupted_parent_is_detected_by_verify_and_unpack(chain: Chain, tmp_path: Path) -> None:
    s1 = chain.pack(1, None, codec="none")
    chain.mem[:4096] = os.urandom(4096)
    chain.pack(2, s1.index)
    raw = bytearray(chain.path(1).read_bytes())
    raw[len(raw) // 2] ^= 0x40  # inside a stored chunk the child refers to
    chain.path(1).write_bytes(raw)
    verify_image(chain.path(2))  # alone, the child's own bytes are fine
    with pytest.raises(CorruptImageError) as exc:
        verify_image(chain.path(2), chain.path)
    assert str(chain.path(1)) in str(exc.value)
    with pytest.raises(CorruptImageError):
        unpack_image(chain.path(2), tmp_path / "out", chain.path)
    assert not (tmp_path / "out").exists()


def test_missing_or_wrong_parent(chain: Chain, tmp_path: Path) -> None:
    s1 = chain.pack(1, None)
    chain.pack(2, s1.index)
    with pytest.raises(UnsupportedImageError, match="needs its parent"):
        unpack_image(chain.path(2), tmp_path / "o1")
    summary = verify_image(chain.path(2))
    assert summary.parents == [1] and not summary.parents_verified
    chain.path(1).rename(tmp_path / "elsewhere.hck")
    with pytest.raises(UnreadableImageError, match="missing"):
        verify_image(chain.path(2), chain.path)
    # the resolver hands back an image with another ckptid: refused, not trusted
    with pytest.raises(CorruptImageError, match="checkpoint 2"):
        unpack_image(chain.path(2), tmp_path / "o2", lambda c: chain.path(2))
    assert not (tmp_path / "o2").exists()


def test_parent_of_another_user_is_refused(chain: Chain, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with open(other / "ckpt-1.hck", "wb") as f:
        (chain.src / "pages-1.img").write_bytes(chain.mem)
        st = pack_dir(chain.src, f, meta(1, uid=2000), chunk_size=MiB)
    assert st.index is not None
    with pytest.raises(ValueError, match="uid"):
        pack_dir(chain.src, io.BytesIO(), meta(2), chunk_size=MiB, parent=st.index)


def test_parallel_compression_writes_the_same_image(chain: Chain) -> None:
    chain.mem[: 4 * MiB] = bytes(4 * MiB)  # compressible half, random half
    chain.pack(1, None)
    images = []
    for workers in (1, 4):
        buf = io.BytesIO()
        pack_dir(chain.src, buf, meta(1), codec="zstd", chunk_size=256 << 10, workers=workers)
        images.append(buf.getvalue())
    assert images[0] == images[1]
    assert len(images[0]) < 5 * MiB  # the zero half compressed


def test_adaptive_compression_gives_up_and_reprobes() -> None:
    a = Adaptive()
    for _ in range(GIVE_UP_AFTER):
        assert a.should_try()
        a.outcome(False)
    assert not a.should_try()  # given up for this section
    a.new_section()
    assert a.should_try()
