"""Unpack never writes outside its target, never follows links, and strips dangerous modes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import xxhash

from hpcckpt.errors import StoreError, UnsafePathError
from hpcckpt.image import format as F
from hpcckpt.image import unpack_image, verify_image
from hpcckpt.image.errors import CorruptImageError, UnsafeImageError
from tests.image.conftest import craft, pack_bytes, section


def one_file(name: bytes, data: bytes = b"pwned", mode: int = 0o100644) -> bytes:
    chunk = F.CHUNK.pack(0, F.C_NONE, 0, 0, 0, len(data), xxhash.xxh3_128_digest(data)) + data
    return craft([
        (F.T_SECTION_BEGIN, 0, section(0, name, size=len(data), mode=mode)),
        (F.T_CHUNK, 0, chunk),
        (F.T_SECTION_END, 0, F.SECTION_END.pack(0, 1, len(data))),
    ])


@pytest.mark.parametrize(
    "name", [b"../escape", b"/etc/escape", b"a/../../escape", b"a//b", b"./a", b"a/.", b"", b"a\0b", b"x" * 5000]
)
def test_unsafe_names_refused_and_nothing_written(tmp_path: Path, name: bytes) -> None:
    dest = tmp_path / "a" / "b" / "dest"
    dest.parent.mkdir(parents=True)
    img = one_file(name)
    with pytest.raises(UnsafeImageError):
        verify_image(io.BytesIO(img))
    with pytest.raises(UnsafeImageError):
        unpack_image(io.BytesIO(img), dest)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]


def test_device_kind_refused(tmp_path: Path) -> None:
    img = craft([(F.T_SECTION_BEGIN, 0, section(0, b"dev", kind=3, mode=0o020666))])
    with pytest.raises(CorruptImageError, match="section kind 3"):
        unpack_image(io.BytesIO(img), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_setuid_bits_stripped(tmp_path: Path) -> None:
    unpack_image(io.BytesIO(one_file(b"tool", mode=0o104755)), tmp_path / "out")
    assert (tmp_path / "out" / "tool").stat().st_mode & 0o7777 == 0o755


def test_dest_symlink_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "dest").symlink_to(target)
    with pytest.raises(UnsafePathError):
        unpack_image(io.BytesIO(one_file(b"f")), tmp_path / "dest")
    assert list(target.iterdir()) == []


def test_dest_must_be_empty(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.img").write_bytes(b"old")
    with pytest.raises(StoreError, match="not empty"):
        unpack_image(io.BytesIO(one_file(b"f")), dest)
    assert [p.name for p in dest.iterdir()] == ["old.img"]


def test_unpack_into_existing_empty_dir_and_readonly_subdir(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "ro").mkdir(parents=True)
    (src / "ro" / "f").write_bytes(b"data")
    os.chmod(src / "ro", 0o555)
    dest = tmp_path / "dest"
    dest.mkdir()
    unpack_image(io.BytesIO(pack_bytes(src)), dest)
    assert (dest / "ro" / "f").read_bytes() == b"data"
    # directories keep their bits, plus owner rwx so the owner can clean up
    assert (dest / "ro").stat().st_mode & 0o777 == 0o755
    assert [p.name for p in dest.iterdir()] == ["ro"]  # no staging left behind
