"""Flush semantics on a real store and SQLite catalog: skip/queue, no pile-up, markers, crashes, salvage."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from pathlib import Path

import pytest

from hpcckpt.catalog import Catalog, Status, open_catalog
from hpcckpt.context import User
from hpcckpt.core.pipeline.flush import (
    Admission,
    Flusher,
    FlushSettings,
    StorePublisher,
    Write,
    flush_one,
    salvage_staging,
)
from hpcckpt.core.pipeline.staging import DONE_MARKER, StagedCheckpoint
from hpcckpt.image import verify_image
from hpcckpt.store.images import Store
from tests.pipeline.conftest import dirs, memory, stage

MiB = 1 << 20
SETTINGS = FlushSettings(chunk_size=256 << 10)


class GatedPublisher(StorePublisher):
    """The real publisher, held at the start of each publish until the test opens the gate."""

    def __init__(self, store: Store, me: User) -> None:
        super().__init__(store, lambda: open_catalog(None, store.root, me))
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def publish(self, staged: StagedCheckpoint, parent: int | None, write: Write) -> tuple[int, Path]:
        self.entered.release()
        assert self.gate.wait(30)
        return super().publish(staged, parent, write)


def committed(cat: Catalog, job: str = "77") -> list[int]:
    return sorted(r.ckptid for r in cat.committed(job))


@pytest.mark.parametrize("on_busy", ["skip", "queue"])
def test_busy_flusher_skips_or_queues_one_and_never_piles_up(
    on_busy: str, tmp_path: Path, store: Store, me: User, catalog: Catalog
) -> None:
    pub = GatedPublisher(store, me)
    fl = Flusher(pub, FlushSettings(on_busy=on_busy, chunk_size=256 << 10))
    staging = tmp_path / "staging"
    mem = memory(2 * MiB)
    assert fl.admit() is Admission.GO
    assert fl.submit(stage(staging, me, bytes(mem)))
    assert pub.entered.acquire(timeout=10)  # the first flush is running (held)
    second = stage(staging, me, bytes(mem))
    if on_busy == "skip":
        assert fl.admit() is Admission.SKIP
        assert not fl.submit(second)
        assert not second.path.exists()  # a skipped dump is removed at once
    else:
        assert fl.admit() is Admission.QUEUE
        assert fl.submit(second)
        third = stage(staging, me, bytes(mem))
        assert fl.admit() is Admission.SKIP and not fl.submit(third)
        assert not third.path.exists()
    assert len(dirs(staging)) == (1 if on_busy == "skip" else 2)  # never more than flushing + one waiting
    pub.gate.set()
    assert fl.drain(60)
    fl.close(10)
    pub.close()
    ids = committed(catalog)
    assert len(ids) == (1 if on_busy == "skip" else 2)
    assert dirs(staging) == []  # flushed dumps leave nothing behind
    if on_busy == "queue":  # the queued one went incremental on the first
        rec = catalog.get(ids[1])
        assert rec is not None and rec.parent == ids[0]
        assert verify_image(Path(rec.path), lambda c: Path(catalog.get(c).path)).parents == [ids[0]]  # type: ignore[union-attr]
    assert [r.ok for r in fl.results] == [True] * len(ids)


def test_chain_goes_full_again_after_full_every(tmp_path: Path, publisher: StorePublisher, me: User,
                                                catalog: Catalog) -> None:
    fl = Flusher(publisher, FlushSettings(on_busy="queue", chunk_size=256 << 10, full_every=2))
    mem = memory(MiB)
    for i in range(4):
        mem[:100] = bytes([i]) * 100
        assert fl.submit(stage(tmp_path / "st", me, bytes(mem)), force=True, timeout=60)
        assert fl.drain(60)
    fl.close(10)
    parents = [catalog.get(c).parent for c in committed(catalog)]  # type: ignore[union-attr]
    ids = committed(catalog)
    assert parents == [None, ids[0], ids[1], None]


def test_salvage_publishes_only_complete_stages_once(tmp_path: Path, publisher: StorePublisher, me: User,
                                                     catalog: Catalog) -> None:
    st = tmp_path / "staging"
    mem = memory(MiB)
    done = stage(st, me, bytes(mem))
    partial = stage(st, me, bytes(mem), done=False)  # the dump was interrupted: no marker
    flushed = stage(st, me, bytes(mem))
    res, _ = flush_one(flushed, publisher, SETTINGS, None)  # committed, but its dir was not removed yet
    (st / "stray-file").write_bytes(b"x")
    report = salvage_staging(st, publisher, me, SETTINGS)
    assert report.errors == []
    assert len(report.published) == 1 and res.ckptid not in report.published
    assert sorted(report.removed) == sorted([done.name, partial.name, flushed.name, "stray-file"])
    assert dirs(st) == []
    assert res.ckptid is not None and committed(catalog) == sorted([res.ckptid, *report.published])
    rec = catalog.get(report.published[0])
    assert rec is not None and rec.meta.get("stage") == done.name
    assert rec.parent == res.ckptid  # salvage goes incremental on the latest committed image
    verify_image(Path(rec.path), lambda c: Path(catalog.get(c).path))  # type: ignore[union-attr]


def test_salvage_never_follows_a_planted_symlink(tmp_path: Path, publisher: StorePublisher, me: User,
                                                 catalog: Catalog) -> None:
    st = tmp_path / "staging"
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"do not pack me")
    s = stage(st, me, b"pages")
    (s.path / "dump").rename(s.path / "real-dump")
    os.symlink(secret, s.path / "dump")
    report = salvage_staging(st, publisher, me, SETTINGS)
    # a stage whose dump is not a real directory is not complete: removed, never packed
    assert report.published == [] and report.removed == [s.name]
    assert committed(catalog) == [] and (secret / "key").read_bytes() == b"do not pack me" and dirs(st) == []


def _crash_at_written(store_root: str, me: User, stage_path: str) -> None:
    def hook(step: str) -> None:
        if step == "written":
            os.kill(os.getpid(), signal.SIGKILL)

    store = Store(Path(store_root), me, step_hook=hook)
    pub = StorePublisher(store, lambda: open_catalog(None, store.root, me))
    st_root = Path(stage_path).parent
    fd = os.open(st_root, os.O_RDONLY | os.O_DIRECTORY)
    staged = StagedCheckpoint.load(fd, Path(stage_path).name, st_root)
    assert staged is not None
    flush_one(staged, pub, SETTINGS, None)


def test_crash_mid_flush_leaves_nothing_a_reader_takes_and_epilog_salvages(
    tmp_path: Path, store: Store, me: User, publisher: StorePublisher, catalog: Catalog
) -> None:
    st = tmp_path / "staging"
    s = stage(st, me, bytes(memory(2 * MiB)))
    proc = multiprocessing.get_context("fork").Process(target=_crash_at_written,
                                                       args=(str(store.root), me, str(s.path)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert catalog.latest("77") is None  # readers take committed rows only
    rows = catalog.list("77")
    assert [r.status for r in rows] == [Status.WRITING]
    assert all(e.temp for e in store.scan())  # only a temp file, no ckpt-N.hck
    assert (s.path / DONE_MARKER).exists()
    report = salvage_staging(st, publisher, me, SETTINGS)
    assert len(report.published) == 1
    rec = catalog.latest("77")
    assert rec is not None and rec.ckptid == report.published[0]
    assert verify_image(Path(rec.path)).meta.ckptid == rec.ckptid


def test_abort_leaves_the_staged_dump_for_the_epilog(tmp_path: Path, store: Store, me: User,
                                                     catalog: Catalog) -> None:
    pub = GatedPublisher(store, me)
    fl = Flusher(pub, SETTINGS)
    s = stage(tmp_path / "st", me, bytes(memory(2 * MiB)))
    assert fl.submit(s)
    assert pub.entered.acquire(timeout=10)
    threading.Timer(0.2, pub.gate.set).start()  # the publish resumes after abort() has been called
    left = fl.abort(timeout=30)
    assert [x.name for x in left] == [s.name]
    assert fl.results and not fl.results[0].ok and "aborted" in fl.results[0].error
    assert catalog.latest("77") is None
    assert [r.status for r in catalog.list("77")] == [Status.FAILED]
    assert (s.path / DONE_MARKER).exists() and not [e for e in store.scan() if e.temp]
    pub.close()
