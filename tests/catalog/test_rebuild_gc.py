"""Rebuilding a lost catalog from real images, checking, and gc of leftovers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from hpcckpt.catalog import Catalog, Status, open_catalog
from hpcckpt.context import User
from hpcckpt.store.check import check_consistency
from hpcckpt.store.gc import collect_garbage
from hpcckpt.store.images import Store
from hpcckpt.store.rebuild import rebuild_catalog
from hpcckpt.store.retention import RetentionRules, apply_retention

image = pytest.importorskip("hpcckpt.image")

KEYS = ("ckptid", "job_id", "step", "array_job_id", "array_task_id", "uid", "user", "node", "path",
        "size_bytes", "engine", "status", "parent", "requeue_count")


def _publish_real(cat: Catalog, store: Store, src: Path, job: str, **kw: Any) -> int:
    parent = kw.pop("parent", None)
    with store.publish(cat, job_id=job, engine="files", node="node7", parent=parent, **kw) as pub:
        meta = image.ImageMeta(
            ckptid=pub.ckptid, job_id=job, engine="files", parent_ckptid=parent, uid=store.user.uid,
            gid=store.user.gid, user=store.user.name, node="node7", step=kw.get("step"),
            array_job_id=kw.get("array_job_id"), array_task_id=kw.get("array_task_id"),
            requeue_count=kw.get("requeue_count", 0),
        )
        image.pack_dir(src, pub.file, meta)
    return pub.ckptid


def _populate(cat: Catalog, store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages.img").write_bytes(os.urandom(50_000))
    a = _publish_real(cat, store, src, "100")
    _publish_real(cat, store, src, "100", parent=a, requeue_count=1)
    _publish_real(cat, store, src, "200_3", array_job_id="200", array_task_id="3", step="batch")
    with pytest.raises(RuntimeError), store.publish(cat, job_id="100", engine="files", node="n") as pub:
        pub.file.write(b"partial")
        raise RuntimeError("engine failed")
    for _ in range(3):
        _publish_real(cat, store, src, "300")
    apply_retention(cat, store, RetentionRules(keep_last=1), job_id="300")


def _committed(cat: Catalog) -> list[tuple[Any, ...]]:
    return [tuple(r.to_dict()[k] for k in KEYS) for r in cat.list() if r.status is Status.COMMITTED]


def test_delete_sqlite_catalog_then_rebuild(store_root: Path, me: User, tmp_path: Path) -> None:
    cat = open_catalog(None, store_root, me)
    store = Store(store_root, me)
    _populate(cat, store, tmp_path)
    before = _committed(cat)
    top = max(r.ckptid for r in cat.list(include_deleted=True))
    assert len(before) == 4
    cat.close()
    os.unlink(store_root / me.name / "catalog.sqlite")

    cat = open_catalog(None, store_root, me)
    assert cat.list() == []
    assert {f.kind for f in check_consistency(cat, store)} == {"untracked_image"}
    report = rebuild_catalog(cat, store)
    assert report.skipped == [] and len(report.added) == 4
    assert _committed(cat) == before
    assert check_consistency(cat, store) == []
    assert cat.begin(job_id="100", uid=me.uid, user=me.name, node="n", engine="files") > top
    assert rebuild_catalog(cat, store).added == []  # idempotent
    cat.close()


@pytest.mark.postgres
def test_rebuild_into_postgres(store_root: Path, me: User, tmp_path: Path, fresh_pg_url: str,
                               pg_server: Any) -> None:
    cat = open_catalog(fresh_pg_url, store_root, me)
    store = Store(store_root, me)
    _populate(cat, store, tmp_path)
    before = _committed(cat)
    cat.close()
    empty = open_catalog(pg_server.create_database("hpcckpt_rebuilt"), store_root, me)
    rebuild_catalog(empty, store, verify=True)
    assert _committed(empty) == before
    empty.close()


def test_rebuild_skips_corrupt_and_misnamed_images(cat: Catalog, store_root: Path, me: User,
                                                   tmp_path: Path) -> None:
    store = Store(store_root, me)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    good = _publish_real(cat, store, src, "1")
    job_dir = store.job_dir("1")
    (job_dir / "ckpt-999.hck").write_bytes(b"garbage, not an image")
    os.link(job_dir / f"ckpt-{good}.hck", job_dir / "ckpt-998.hck")  # header says `good`
    report = rebuild_catalog(cat, store)
    reasons = {Path(s["path"]).name: s["reason"] for s in report.skipped}
    assert set(reasons) == {"ckpt-999.hck", "ckpt-998.hck"}
    assert f"header says {good}" in reasons["ckpt-998.hck"]
    assert report.present == [good] and report.added == []


def test_gc_removes_leftovers_but_never_untracked_images(cat: Catalog, store_root: Path, me: User) -> None:
    store = Store(store_root, me)
    with store.publish(cat, job_id="5", engine="files", node="n") as keep:
        keep.file.write(b"k")
    d = store.job_dir("5")
    old = time.time() - 3600
    tmp = d / ".tmp-ckpt-77.hck.1.abcd"
    tmp.write_bytes(b"partial")
    os.utime(tmp, (old, old))
    fresh_tmp = d / ".tmp-ckpt-78.hck.1.abcd"
    fresh_tmp.write_bytes(b"maybe still being written")
    untracked = d / "ckpt-5000.hck"
    untracked.write_bytes(b"lost row")
    # A writer on another node: its liveness cannot be checked, only its age.
    other = cat.begin(job_id="5", uid=me.uid, user=me.name, node="far", engine="files",
                      meta={"writer": {"node": "far-away-node", "pid": 1, "start": 0}})

    dry = collect_garbage(cat, store, RetentionRules(), dry_run=True, grace=60)
    assert [f["path"] for f in dry.removed_files] == [str(tmp)] and tmp.exists()

    report = collect_garbage(cat, store, RetentionRules(), grace=60)
    assert not tmp.exists() and fresh_tmp.exists() and untracked.exists()
    assert report.failed_rows == []
    rec = cat.get(other)
    assert rec is not None and rec.status is Status.WRITING

    later = collect_garbage(cat, store, RetentionRules(), stale_after=10, now=time.time() + 60)
    assert later.failed_rows == [other]
    rec = cat.get(other)
    assert rec is not None and rec.status is Status.FAILED and "gc" in rec.error
    latest = cat.latest("5")
    assert latest is not None and latest.ckptid == keep.ckptid
