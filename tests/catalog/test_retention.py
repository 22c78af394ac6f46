"""Retention: the pure selection rules, then applied to a real catalog and store."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcckpt.catalog import Catalog, CkptRecord, Status
from hpcckpt.context import User
from hpcckpt.errors import PolicyError
from hpcckpt.store.images import Store
from hpcckpt.store.retention import RetentionRules, apply_retention, select_for_deletion

NOW = 1_000_000.0


def rec(ckptid: int, job: str = "j", *, status: Status = Status.COMMITTED, parent: int | None = None,
        size: int = 100, age: float = 0.0) -> CkptRecord:
    return CkptRecord(ckptid=ckptid, job_id=job, status=status, parent=parent, size_bytes=size,
                      created=NOW - age, engine="criu")


def test_keep_last() -> None:
    rows = [rec(i) for i in range(1, 7)]
    assert select_for_deletion(rows, RetentionRules(keep_last=3), NOW) == [1, 2, 3]


def test_keep_last_is_per_job_and_ignores_other_states() -> None:
    rows = [rec(1, "a"), rec(2, "b"), rec(3, "a"), rec(4, "a", status=Status.FAILED), rec(5, "a"),
            rec(6, "a", status=Status.WRITING)]
    assert select_for_deletion(rows, RetentionRules(keep_last=2), NOW) == [1]


def test_keep_every_counts_whole_history() -> None:
    # 1..3 already deleted; ordinals keep counting them, so 4 and 8 are the 4th and 8th.
    rows = [rec(i, status=Status.DELETED) for i in (1, 2, 3)] + [rec(i) for i in range(4, 11)]
    victims = select_for_deletion(rows, RetentionRules(keep_last=1, keep_every=4), NOW)
    assert victims == [5, 6, 7, 9]


def test_max_age_but_never_the_newest() -> None:
    rows = [rec(1, age=500), rec(2, age=400), rec(3, age=300)]
    assert select_for_deletion(rows, RetentionRules(keep_last=3, max_age=100), NOW) == [1, 2]


def test_max_bytes_oldest_first_across_jobs() -> None:
    rows = [rec(1, "a", age=50, size=100), rec(2, "b", age=40, size=100), rec(3, "a", age=30, size=100),
            rec(4, "b", age=20, size=100)]
    assert select_for_deletion(rows, RetentionRules(keep_last=5, max_bytes=250), NOW) == [1, 2]
    # Even a budget below one image keeps each job's newest.
    assert select_for_deletion(rows, RetentionRules(keep_last=5, max_bytes=1), NOW) == [1, 2]


def test_parents_of_kept_images_are_kept() -> None:
    # 1 full, 2 <- 3 <- 4 incremental chain on 1; keep_last=1 keeps 4, so 1..3 must stay.
    rows = [rec(1), rec(2, parent=1), rec(3, parent=2), rec(4, parent=3)]
    assert select_for_deletion(rows, RetentionRules(keep_last=1), NOW) == []
    rows.append(rec(5))  # a new full image: the old chain may go
    assert select_for_deletion(rows, RetentionRules(keep_last=1), NOW) == [1, 2, 3, 4]
    rows.append(rec(6, parent=5))
    assert select_for_deletion(rows, RetentionRules(keep_last=1, max_bytes=1), NOW) == [1, 2, 3, 4]


def test_bad_policy_values_are_refused() -> None:
    with pytest.raises(PolicyError, match="keep_last"):
        RetentionRules(keep_last=0)
    with pytest.raises(PolicyError, match="max_bytes"):
        RetentionRules(max_bytes=-1)


@st.composite
def histories(draw: st.DrawFn) -> list[CkptRecord]:
    n = draw(st.integers(1, 30))
    rows: list[CkptRecord] = []
    for i in range(1, n + 1):
        status = draw(st.sampled_from([Status.COMMITTED] * 3 + [Status.FAILED, Status.DELETED]))
        job = draw(st.sampled_from("ab"))
        earlier = [r.ckptid for r in rows if r.job_id == job]
        parent = draw(st.sampled_from([None, *earlier])) if earlier else None
        rows.append(rec(i, job, status=status, parent=parent, size=draw(st.integers(1, 1000)),
                        age=float(n - i) * 10))
    return rows


@given(histories(), st.integers(1, 5), st.integers(0, 4), st.none() | st.floats(1, 400),
       st.none() | st.integers(1, 5000))
def test_invariants(rows: list[CkptRecord], keep_last: int, keep_every: int, max_age: float | None,
                    max_bytes: int | None) -> None:
    pol = RetentionRules(keep_last=keep_last, keep_every=keep_every, max_age=max_age, max_bytes=max_bytes)
    victims = set(select_for_deletion(rows, pol, NOW))
    by_id = {r.ckptid: r for r in rows}
    assert all(by_id[v].status is Status.COMMITTED for v in victims)
    for job in "ab":
        live = [r.ckptid for r in rows if r.job_id == job and r.status is Status.COMMITTED]
        if live:
            assert max(live) not in victims  # never a job's newest valid image
    kept = {r.ckptid for r in rows if r.status is Status.COMMITTED} - victims
    for k in kept:
        p = by_id[k].parent
        while p is not None and p in by_id:
            if by_id[p].status is Status.COMMITTED:
                assert p not in victims  # never a parent a kept image needs
            p = by_id[p].parent


def test_apply_retention_deletes_rows_then_files(cat: Catalog, store_root: Path, me: User) -> None:
    store = Store(store_root, me)
    pubs = []
    for _ in range(5):
        with store.publish(cat, job_id="r", engine="files", node="n") as pub:
            pub.file.write(b"z" * 10)
        pubs.append(pub)
    dry = apply_retention(cat, store, RetentionRules(keep_last=2), dry_run=True)
    assert [r.ckptid for r in dry.deleted] == [p.ckptid for p in pubs[:3]]
    assert all(p.path.exists() for p in pubs)  # dry run touches nothing
    res = apply_retention(cat, store, RetentionRules(keep_last=2))
    assert res.bytes_freed == 30 and res.errors == []
    assert [r.ckptid for r in cat.committed("r")] == [pubs[4].ckptid, pubs[3].ckptid]
    assert [p.path.exists() for p in pubs] == [False, False, False, True, True]
    assert {r.status for r in cat.list("r", include_deleted=True)[:3]} == {Status.DELETED}
