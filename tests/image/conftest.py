"""Fixtures for the image tests: small trees, packed images, hand-made records."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from hpcckpt.image import ImageMeta, TaskInfo, pack_dir
from hpcckpt.image import format as F
from hpcckpt.image.pack import _header_payload, _prepare_meta
from hpcckpt.image.records import RecordWriter


def make_tree(root: Path) -> Path:
    """A little directory like a CRIU dump: binary files, text, an empty file, a subdir."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pages-1.img").write_bytes(os.urandom(3000) + bytes(5000))
    (root / "core-1.img").write_bytes(b"core" * 100)
    (root / "empty.img").write_bytes(b"")
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("hello\n" * 50)
    os.chmod(root / "sub" / "notes.txt", 0o640)
    return root


def meta(**kw: object) -> ImageMeta:
    base: dict[str, object] = {"ckptid": 7, "job_id": "4242", "engine": "files", "uid": 1000, "user": "alice"}
    base.update(kw)
    return ImageMeta(**base)  # type: ignore[arg-type]


def pack_bytes(src: Path, **kw: object) -> bytes:
    buf = io.BytesIO()
    pack_dir(src, buf, kw.pop("meta", None) or meta(), **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def craft(records: Sequence[tuple[int, int, bytes]], *, header: bool = True) -> bytes:
    """An image of hand-made records, checksummed and trailed correctly."""
    buf = io.BytesIO()
    w = RecordWriter(buf)
    if header:
        w.write(F.T_HEADER, [_header_payload(_prepare_meta(meta()))])
    for rtype, flags, payload in records:
        w.write(rtype, [payload], flags)
    w.finish()
    return buf.getvalue()


def section(num: int, name: bytes, *, kind: int = F.K_FILE, size: int = 0, mode: int = 0o100644) -> bytes:
    return F.SECTION_BEGIN.pack(num, kind, F.C_NONE, 0, mode, size, 0, len(name)) + name


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


@pytest.fixture(scope="session")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small image with every common record kind: header, tasks, a dir, a file of two chunks."""
    src = tmp_path_factory.mktemp("small")
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(bytes(range(256)) * 16 + b"tail")
    return pack_bytes(src, chunk_size=F.MIN_CHUNK, codec="zstd", tasks=[TaskInfo(1, 0, 1, 1, "sh", ["sh"])])
