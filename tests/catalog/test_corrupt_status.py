"""The 'corrupt' status (schema 2): marking, what list and resume see, and the upgrade of a version-1 catalog."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hpcckpt.catalog import Catalog, Status, open_catalog
from hpcckpt.catalog.schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION, SQLITE_MIGRATIONS
from hpcckpt.context import User


def commit(cat: Catalog, me: User, job: str = "j", parent: int | None = None) -> int:
    c = cat.begin(job_id=job, uid=me.uid, user=me.name, node="n", engine="criu", parent=parent)
    cat.commit(c, path=f"/x/{c}", size_bytes=1, duration=0.1)
    return c


def test_mark_corrupt_takes_a_committed_image_out_of_the_committed_ones(cat: Catalog, me: User) -> None:
    a, b = commit(cat, me), commit(cat, me)
    assert cat.mark_corrupt(b, "is not checkpoint 2: the header says checkpoint 1")
    row = cat.get(b)
    assert row is not None and row.status is Status.CORRUPT and "header says" in row.error
    assert [r.ckptid for r in cat.committed("j")] == [a]
    assert cat.latest("j").ckptid == a  # type: ignore[union-attr]
    assert {r.ckptid: r.status for r in cat.list("j")} == {a: Status.COMMITTED, b: Status.CORRUPT}


def test_mark_corrupt_leaves_other_states_alone(cat: Catalog, me: User) -> None:
    gone = commit(cat, me)
    cat.mark_deleted(gone)
    assert not cat.mark_corrupt(gone, "x")
    assert cat.get(gone).status is Status.DELETED  # type: ignore[union-attr]
    c = cat.begin(job_id="j", uid=me.uid, user=me.name, node="n", engine="criu")
    assert not cat.mark_corrupt(c, "x")
    assert cat.get(c).status is Status.WRITING  # type: ignore[union-attr]


def test_version_1_sqlite_catalog_is_upgraded_with_its_rows_and_ids(tmp_path: Path, me: User) -> None:
    root = tmp_path / "store"
    (root / me.name).mkdir(parents=True)
    db = root / me.name / "catalog.sqlite"
    conn = sqlite3.connect(db)
    for stmt in SQLITE_MIGRATIONS[0][1]:
        conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    for _ in range(3):
        conn.execute("INSERT INTO checkpoints (job_id, uid, \"user\", engine, status, created) "
                     "VALUES ('old', ?, ?, 'criu', 'committed', 0)", (me.uid, me.name))
    conn.execute("DELETE FROM checkpoints WHERE ckptid = 3")  # the counter is ahead of the rows
    conn.commit()
    conn.close()
    cat = open_catalog(None, root, me)
    try:
        assert cat.schema_version() == SCHEMA_VERSION == 3
        assert [r.ckptid for r in cat.list("old")] == [1, 2]
        assert cat.mark_corrupt(2, "damaged")
        assert commit(cat, me, "old") == 4  # no ckptid is ever reused
    finally:
        cat.close()


@pytest.mark.postgres
def test_version_1_postgres_catalog_is_upgraded(fresh_pg_url: str, tmp_path: Path, me: User) -> None:
    import psycopg

    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        for stmt in POSTGRES_MIGRATIONS[0][1]:
            conn.execute(stmt)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute("INSERT INTO checkpoints (job_id, uid, \"user\", engine, status, created) "
                     "VALUES ('old', %s, %s, 'criu', 'committed', 0)", (me.uid, me.name))
    cat = open_catalog(fresh_pg_url, tmp_path, me)
    try:
        assert cat.schema_version() == SCHEMA_VERSION
        (row,) = cat.list("old")
        assert cat.mark_corrupt(row.ckptid, "damaged")
        assert cat.get(row.ckptid).status is Status.CORRUPT  # type: ignore[union-attr]
    finally:
        cat.close()
