"""Retention keeps every image a kept incremental image depends on, across jobs too."""

from __future__ import annotations

from hpcckpt.catalog import Catalog, Status
from hpcckpt.context import User
from hpcckpt.store.images import Store
from hpcckpt.store.retention import RetentionRules, apply_retention


def ckpt(cat: Catalog, store: Store, me: User, job: str, parent: int | None = None) -> int:
    c = cat.begin(job_id=job, uid=me.uid, user=me.name, node="n1", engine="criu", parent=parent)
    cat.commit(c, path=str(store.image_path(job, c)), size_bytes=100, duration=0.1)
    return c


def test_parent_in_another_job_is_kept(catalog: Catalog, store: Store, me: User) -> None:
    a1 = ckpt(catalog, store, me, "100")
    a2 = ckpt(catalog, store, me, "100")
    a3 = ckpt(catalog, store, me, "100")
    b1 = ckpt(catalog, store, me, "200", parent=a1)  # restarted as job 200 from a1, incremental on it
    res = apply_retention(catalog, store, RetentionRules(keep_last=1), job_id="100")
    assert [r.ckptid for r in res.deleted] == [a2]
    assert {r.ckptid: r.status for r in catalog.list(None, include_deleted=True)} == {
        a1: Status.COMMITTED, a2: Status.DELETED, a3: Status.COMMITTED, b1: Status.COMMITTED}


def test_whole_chain_of_a_kept_image_is_kept(catalog: Catalog, store: Store, me: User) -> None:
    c1 = ckpt(catalog, store, me, "300")
    c2 = ckpt(catalog, store, me, "300", parent=c1)
    c3 = ckpt(catalog, store, me, "300", parent=c2)
    c4 = ckpt(catalog, store, me, "300")  # a full image starts a new chain
    c5 = ckpt(catalog, store, me, "300", parent=c4)
    res = apply_retention(catalog, store, RetentionRules(keep_last=2), job_id="300")
    assert sorted(r.ckptid for r in res.deleted) == [c1, c2, c3]
    res = apply_retention(catalog, store, RetentionRules(keep_last=1), job_id="300")
    assert res.deleted == [] and catalog.latest("300").ckptid == c5  # type: ignore[union-attr]
