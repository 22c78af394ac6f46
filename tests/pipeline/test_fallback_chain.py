"""Chains with independent fallbacks: no single damaged image may leave a job with nothing to restore."""

from __future__ import annotations

from pathlib import Path

from hpcckpt.catalog import Catalog, CkptRecord, Status
from hpcckpt.context import User
from hpcckpt.core.pipeline.chain import decide_chain
from hpcckpt.core.pipeline.flush import Flusher, FlushSettings, StorePublisher
from hpcckpt.image.refs import ParentIndex
from hpcckpt.store.retention import RetentionRules, chain_of, fallback_full, select_for_deletion
from tests.pipeline.conftest import memory, stage

NOW = 1_000_000.0
MiB = 1 << 20


def rec(ckptid: int, parent: int | None = None, status: Status = Status.COMMITTED) -> CkptRecord:
    return CkptRecord(ckptid=ckptid, job_id="j", status=status, parent=parent, size_bytes=100, created=NOW,
                      engine="criu")


def test_an_image_goes_incremental_only_with_a_fallback_outside_its_chain() -> None:
    idx = ParentIndex(ckptid=2, depth=0, base=2, base_bytes=100, chain_bytes=100)
    d = decide_chain(idx, incremental=True, full_every=8, max_chain_ratio=2.0, fallback=False)
    assert d.parent is None and "fall back" in d.reason
    assert decide_chain(idx, incremental=True, full_every=8, max_chain_ratio=2.0, fallback=True).parent is idx


def simulate(n: int, *, full_every: int, keep_last: int) -> list[CkptRecord]:
    """n checkpoints of one job under the chain rule and retention, as the flusher and runner apply them."""
    rows: list[CkptRecord] = []
    depth: dict[int, int] = {}
    for c in range(1, n + 1):
        live = [r for r in rows if r.status is Status.COMMITTED]
        parent = None
        if live:
            last = live[-1]
            by_id = {r.ckptid: r for r in rows}
            base = min(chain_of(last.ckptid, by_id))
            fulls = {r.ckptid for r in live if r.parent is None}
            idx = ParentIndex(ckptid=last.ckptid, depth=depth[last.ckptid], base=base, base_bytes=100,
                              chain_bytes=100)
            d = decide_chain(idx, incremental=True, full_every=full_every, max_chain_ratio=1e9,
                             fallback=bool(fulls - {base, last.ckptid}))
            parent = d.parent.ckptid if d.parent is not None else None
        depth[c] = 0 if parent is None else depth[parent] + 1
        rows.append(rec(c, parent))
        victims = set(select_for_deletion(rows, RetentionRules(keep_last=keep_last, fallback_full=True), NOW))
        rows = [rec(r.ckptid, r.parent, Status.DELETED) if r.ckptid in victims else r for r in rows]
    return rows


def restorable(rows: list[CkptRecord], damaged: int) -> list[int]:
    by_id = {r.ckptid: r for r in rows}
    return [r.ckptid for r in rows if r.status is Status.COMMITTED and damaged not in chain_of(r.ckptid, by_id)]


def test_any_single_damaged_image_leaves_one_to_restore() -> None:
    for full_every in (1, 2, 3, 8):
        for keep_last in (1, 2, 3, 9):
            for n in range(1, 30):
                rows = simulate(n, full_every=full_every, keep_last=keep_last)
                live = [r.ckptid for r in rows if r.status is Status.COMMITTED]
                if n >= 2:
                    for damaged in live:
                        assert restorable(rows, damaged), (full_every, keep_last, n, damaged, rows)


def test_the_first_two_images_are_full_then_chains_start() -> None:
    rows = simulate(6, full_every=8, keep_last=9)
    assert [r.parent for r in rows] == [None, None, 2, 3, 4, 5]


def test_retention_keeps_the_newest_full_image_outside_the_newest_chain() -> None:
    rows = [rec(1), rec(2, 1), rec(3), rec(4, 3), rec(5, 4)]
    by_id = {r.ckptid: r for r in rows}
    assert fallback_full(rows, by_id) == 1
    assert select_for_deletion(rows, RetentionRules(keep_last=1, fallback_full=True), NOW) == [2]
    assert select_for_deletion(rows, RetentionRules(keep_last=1), NOW) == [1, 2]  # the rule off: only the chain
    # A corrupt full image is no fallback: the next older one is.
    rows = [rec(1), rec(2), rec(3, status=Status.CORRUPT), rec(4), rec(5, 4)]
    assert fallback_full(rows, {r.ckptid: r for r in rows}) == 2


def test_flusher_keeps_a_full_fallback_and_never_chains_on_a_corrupt_image(
    tmp_path: Path, publisher: StorePublisher, me: User, catalog: Catalog
) -> None:
    fl = Flusher(publisher, FlushSettings(on_busy="queue", chunk_size=256 << 10, full_every=8, fallback_full=True))
    mem = memory(MiB)

    def one(i: int) -> None:
        mem[:100] = bytes([i]) * 100
        assert fl.submit(stage(tmp_path / "st", me, bytes(mem)), force=True, timeout=60)
        assert fl.drain(60)

    for i in range(4):
        one(i)
    ids = sorted(r.ckptid for r in catalog.committed("77"))
    assert [catalog.get(c).parent for c in ids] == [None, None, ids[1], ids[2]]  # type: ignore[union-attr]
    assert catalog.mark_corrupt(ids[1], "a flipped byte")  # the base of the chain the flusher is on
    one(4)
    fl.close(10)
    newest = max(r.ckptid for r in catalog.committed("77"))
    assert catalog.get(newest).parent is None  # type: ignore[union-attr]
    assert "no longer committed" in fl.results[-1].chain
