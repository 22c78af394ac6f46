"""The catalog interface, run against both backends (SQLite and a real PostgreSQL)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hpcckpt.catalog import Catalog, CkptRecord, Status, open_catalog
from hpcckpt.catalog.schema import SCHEMA_VERSION
from hpcckpt.context import User, user_by_name
from hpcckpt.errors import CatalogError, CatalogVersionError, NotFoundError, PermissionDeniedError


def _begin(cat: Catalog, user: User, job: str = "4242", **kw: object) -> int:
    return cat.begin(job_id=job, uid=user.uid, user=user.name, node="node1", engine="criu", **kw)  # type: ignore[arg-type]


def test_ckptids_positive_unique_increasing(cat: Catalog, me: User) -> None:
    ids = [_begin(cat, me) for _ in range(20)]
    assert all(i > 0 for i in ids)
    assert ids == sorted(set(ids))


def test_latest_is_newest_committed_only(cat: Catalog, me: User) -> None:
    assert cat.latest("4242") is None
    a = _begin(cat, me)
    cat.commit(a, path="/s/a", size_bytes=10, duration=0.5)
    b = _begin(cat, me)  # still writing: never the latest
    latest = cat.latest("4242")
    assert latest is not None and latest.ckptid == a
    cat.commit(b, path="/s/b", size_bytes=20, duration=0.1)
    c = _begin(cat, me)
    cat.fail(c, "boom")
    latest = cat.latest("4242")
    assert latest is not None and latest.ckptid == b and latest.size_bytes == 20
    assert [r.ckptid for r in cat.committed("4242")] == [b, a]
    cat.mark_deleted(b)
    latest = cat.latest("4242")
    assert latest is not None and latest.ckptid == a
    assert cat.latest("other-job") is None


def test_row_fields_round_trip(cat: Catalog, me: User) -> None:
    parent = _begin(cat, me, job="7_3")
    cat.commit(parent, path="/p", size_bytes=1, duration=0.0)
    ck = _begin(
        cat, me, job="7_3", step="batch", array_job_id="7", array_task_id="3", parent=parent,
        requeue_count=2, meta={"policy": "abc", "n": [1, 2]},
    )
    cat.commit(ck, path="/s/ckpt.hck", size_bytes=12345678901, duration=2.5)
    cat.record_resume(ck, resumed_by="8", new_job_id="9")
    rec = cat.get(ck)
    assert isinstance(rec, CkptRecord)
    assert (rec.job_id, rec.step, rec.array_job_id, rec.array_task_id) == ("7_3", "batch", "7", "3")
    assert (rec.uid, rec.user, rec.node, rec.engine) == (me.uid, me.name, "node1", "criu")
    assert (rec.path, rec.size_bytes, rec.status, rec.parent) == ("/s/ckpt.hck", 12345678901, Status.COMMITTED, parent)
    assert rec.requeue_count == 2 and rec.resumed_by == "8" and rec.new_job_id == "9"
    assert rec.meta == {"policy": "abc", "n": [1, 2]}
    assert rec.finished is not None and rec.finished >= rec.created and rec.duration == 2.5
    doc = rec.to_dict()
    for key in ("ckptid", "job_id", "status", "size_bytes", "created", "node", "path", "parent"):
        assert key in doc
    assert doc["status"] == "committed"


def test_commit_refuses_non_writing_and_unknown(cat: Catalog, me: User) -> None:
    ck = _begin(cat, me)
    cat.fail(ck, "writer died")
    with pytest.raises(CatalogError, match="is failed"):
        cat.commit(ck, path="/x", size_bytes=1, duration=0)
    rec = cat.get(ck)
    assert rec is not None and rec.error == "writer died"
    with pytest.raises(NotFoundError):
        cat.commit(999999, path="/x", size_bytes=1, duration=0)
    assert cat.get(999999) is None


def test_list_filters_and_order(cat: Catalog, me: User) -> None:
    a = _begin(cat, me, job="1")
    b = _begin(cat, me, job="2")
    c = _begin(cat, me, job="1")
    cat.mark_deleted(c)
    assert [r.ckptid for r in cat.list()] == [a, b]
    assert [r.ckptid for r in cat.list("1")] == [a]
    assert [r.ckptid for r in cat.list("1", include_deleted=True)] == [a, c]


def test_job_events(cat: Catalog, me: User) -> None:
    cat.record_job_event("55", uid=me.uid, event="requeued", detail="preempted", node="n3")
    cat.record_job_event("55", uid=me.uid, event="completed", detail="exit 0")
    ev = cat.job_events("55")
    assert [e["event"] for e in ev] == ["requeued", "completed"]
    assert ev[0]["detail"] == "preempted" and ev[0]["node"] == "n3" and ev[0]["uid"] == me.uid
    assert cat.job_events("56") == []


def test_insert_records_keeps_ids_and_moves_counter(cat: Catalog, me: User) -> None:
    recs = [
        CkptRecord(ckptid=i, job_id="r", uid=me.uid, user=me.name, engine="criu", status=Status.COMMITTED,
                   path=f"/r/{i}", size_bytes=i, created=float(i))
        for i in (5, 9, 7)
    ]
    assert cat.insert_records(recs) == 3
    assert cat.insert_records(recs[:1]) == 0  # already there: skipped, not duplicated
    latest = cat.latest("r")
    assert latest is not None and latest.ckptid == 9
    assert _begin(cat, me) > 9


@pytest.mark.multiuser
@pytest.mark.postgres
def test_shared_catalog_users_see_only_their_rows(fresh_pg_url: str, store_root: Path) -> None:
    alice, bob = user_by_name("alice"), user_by_name("bob")
    root = User("root", 0, 0, "/root")
    cat_a, cat_b, cat_r = (open_catalog(fresh_pg_url, store_root, u) for u in (alice, bob, root))
    try:
        ca = _begin(cat_a, alice, job="100")
        cat_a.commit(ca, path="/a", size_bytes=1, duration=0)
        cb = _begin(cat_b, bob, job="100")
        cat_b.commit(cb, path="/b", size_bytes=1, duration=0)
        latest_a, latest_b = cat_a.latest("100"), cat_b.latest("100")
        assert latest_a is not None and latest_a.ckptid == ca
        assert latest_b is not None and latest_b.ckptid == cb
        assert [r.ckptid for r in cat_a.list()] == [ca]
        assert {r.ckptid for r in cat_r.list()} == {ca, cb}  # root sees all
        with pytest.raises(PermissionDeniedError):
            cat_a.mark_deleted(cb)
        with pytest.raises(PermissionDeniedError):
            cat_a.get(cb)
        with pytest.raises(PermissionDeniedError):
            _begin(cat_a, bob, job="100")
        with pytest.raises(PermissionDeniedError):
            cat_a.list(uid=bob.uid)
        cat_r.mark_deleted(cb)  # root may act on anyone's rows
        assert cat_b.latest("100") is None
    finally:
        for c in (cat_a, cat_b, cat_r):
            c.close()


@pytest.mark.multiuser
def test_sqlite_catalogs_are_per_user_files(store_root: Path) -> None:
    """Root acting for alice creates alice's catalog as alice; alice's identity cannot open bob's."""
    alice, bob = user_by_name("alice"), user_by_name("bob")
    cat_a = open_catalog(None, store_root, alice)
    _begin(cat_a, alice)
    cat_a.close()
    path = store_root / "alice" / "catalog.sqlite"
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (alice.uid, alice.gid, 0o600)
    assert (store_root / "alice").stat().st_uid == alice.uid
    # bob's identity pointed at alice's file: the kernel refuses, and the error names the file.
    with pytest.raises(CatalogError, match=r"alice/catalog\.sqlite"):
        open_catalog(str(path), store_root, bob)


def test_sqlite_refuses_newer_schema(store_root: Path, me: User) -> None:
    cat = open_catalog(None, store_root, me)
    path = Path(cat.location)
    cat.close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(CatalogVersionError, match="newer than this hpcckpt") as err:
        open_catalog(None, store_root, me)
    assert str(path) in str(err.value) and err.value.hint


@pytest.mark.postgres
def test_postgres_refuses_newer_schema(fresh_pg_url: str, store_root: Path, me: User) -> None:
    import psycopg

    open_catalog(fresh_pg_url, store_root, me).close()
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(CatalogVersionError, match="newer than this hpcckpt"):
        open_catalog(fresh_pg_url, store_root, me)


def test_sqlite_files_private_and_rollback_journal(store_root: Path, me: User) -> None:
    cat = open_catalog(None, store_root, me)
    _begin(cat, me)
    path = Path(cat.location)
    assert path == store_root / me.name / "catalog.sqlite"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    cat.close()


def test_sqlite_garbage_file_is_a_clear_error(store_root: Path, me: User) -> None:
    path = store_root / "bad.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CatalogError, match=r"bad\.sqlite") as err:
        open_catalog(str(path), store_root, me)
    assert "rebuild" in (err.value.hint or "")


def test_commit_merges_what_the_writer_measured_into_meta(cat: Catalog, me: User) -> None:
    ck = cat.begin(job_id="m", uid=me.uid, user=me.name, node="n", engine="criu",
                   meta={"stage": "stage-1", "frozen_s": 0.25})
    cat.commit(ck, path="/x/ckpt-1.hck", size_bytes=10, duration=1.0, meta={"ref_bytes": 7, "bytes_in": 30})
    rec = cat.get(ck)
    assert rec is not None and rec.status == "committed"
    assert rec.meta == {"stage": "stage-1", "frozen_s": 0.25, "ref_bytes": 7, "bytes_in": 30}
