"""The restore path's unpack: a writer thread and early callbacks, with the all-or-nothing promise intact."""

from __future__ import annotations

import io
import os
import subprocess
import threading
from pathlib import Path

import pytest

from hpcckpt.errors import StoreError
from hpcckpt.image import ImageMeta, pack_dir, unpack_image
from hpcckpt.image.errors import CorruptImageError
from hpcckpt.image.unpack import MAX_EARLY


def make_dump(root: Path) -> dict[str, bytes]:
    root.mkdir()
    files = {
        "cpuinfo.img": os.urandom(700),
        "core-1.img": os.urandom(5000),
        "pages-1.img": os.urandom(3 << 20) + bytes(1 << 20),  # several chunks, some compressible
        "big-meta.img": os.urandom(MAX_EARLY + 1),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def packed(src: Path, codec: str) -> bytes:
    buf = io.BytesIO()
    pack_dir(src, buf, ImageMeta(ckptid=3, job_id="j", engine="criu"), codec=codec, chunk_size=256 << 10)
    return buf.getvalue()


@pytest.mark.parametrize("codec", ["none", "zstd", "lz4"])
def test_unpack_writes_every_byte_and_hands_over_verified_small_files(tmp_path: Path, codec: str) -> None:
    files = make_dump(tmp_path / "src")
    img = packed(tmp_path / "src", codec)
    got: dict[str, bytes] = {}
    before = threading.active_count()
    unpack_image(io.BytesIO(img), tmp_path / "dest", on_verified={
        "cpuinfo.img": lambda b: got.__setitem__("cpuinfo.img", b),
        "big-meta.img": lambda b: got.__setitem__("big-meta.img", b),  # too big to be held: never called
    })
    assert {p.name: p.read_bytes() for p in (tmp_path / "dest").iterdir()} == files
    assert got == {"cpuinfo.img": files["cpuinfo.img"]}
    assert threading.active_count() == before  # the writer thread is gone


def test_corrupt_page_chunk_leaves_nothing_though_early_file_was_handed_over(tmp_path: Path) -> None:
    files = make_dump(tmp_path / "src")
    img = bytearray(packed(tmp_path / "src", "none"))
    img[img.index(files["pages-1.img"][(2 << 20) : (2 << 20) + 64])] ^= 0xFF  # a byte deep in the pages
    got: list[bytes] = []
    with pytest.raises(CorruptImageError) as err:
        unpack_image(io.BytesIO(bytes(img)), tmp_path / "dest", on_verified={"cpuinfo.img": got.append})
    assert "checksum" in str(err.value)
    assert got == [files["cpuinfo.img"]]  # verified early; the caller must not act on it before the end
    assert not (tmp_path / "dest").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tiny tmpfs")
def test_full_staging_fails_cleanly_from_the_writer_thread(tmp_path: Path) -> None:
    """ENOSPC on the writer thread becomes the unpack's StoreError, and the partial copy is removed."""
    make_dump(tmp_path / "src")
    img = packed(tmp_path / "src", "none")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "hpcckpt-test", str(small)], check=True)
    try:
        with pytest.raises(StoreError) as err:
            unpack_image(io.BytesIO(img), small / "dest")
        assert "No space left" in str(err.value)
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
