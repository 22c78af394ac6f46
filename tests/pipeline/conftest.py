"""Fixtures for the pipeline tests: a real store with its SQLite catalog, staged dumps."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcckpt.catalog import Catalog, open_catalog
from hpcckpt.context import User, current_user
from hpcckpt.core.pipeline.flush import StorePublisher
from hpcckpt.core.pipeline.staging import StagedCheckpoint
from hpcckpt.image import ImageMeta
from hpcckpt.store.images import Store


@pytest.fixture
def me() -> User:
    return current_user()


@pytest.fixture
def store(tmp_path: Path, me: User) -> Store:
    return Store(tmp_path / "store", me)


@pytest.fixture
def publisher(store: Store, me: User) -> Iterator[StorePublisher]:
    pub = StorePublisher(store, lambda: open_catalog(None, store.root, me))
    yield pub
    pub.close()


@pytest.fixture
def catalog(store: Store, me: User) -> Iterator[Catalog]:
    cat = open_catalog(None, store.root, me)
    yield cat
    cat.close()


def job_meta(me: User, job_id: str = "77") -> ImageMeta:
    return ImageMeta(ckptid=0, job_id=job_id, engine="files", uid=me.uid, gid=me.gid, user=me.name, node="n1")


def stage(root: Path, me: User, pages: bytes, job_id: str = "77", done: bool = True) -> StagedCheckpoint:
    """A staged 'dump' of one pages file and a small pagemap, marked complete."""
    s = StagedCheckpoint.create(root, me)
    (s.dump_dir / "pages-1.img").write_bytes(pages)
    (s.dump_dir / "pagemap-1.img").write_bytes(b"pm" * 50)
    if done:
        s.mark_done(job_meta(me, job_id), me)
    return s


def memory(size: int, seed: int = 1) -> bytearray:
    """Incompressible 'memory' that is the same for the same seed."""
    import random

    return bytearray(random.Random(seed).randbytes(size))


def dirs(root: Path) -> list[str]:
    return sorted(os.listdir(root)) if root.exists() else []
