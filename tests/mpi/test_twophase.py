"""The Checkpointer's collective protocol, with ranks as threads (real store, catalog and images)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hpcckpt.app.checkpointer import Checkpointer, Resized
from hpcckpt.catalog import Status, open_catalog
from hpcckpt.context import current_user
from hpcckpt.errors import MPIError, PolicyError
from tests.mpi.fakes import ThreadCoordinator, ThreadGroup


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("HPCCKPT_POLICY", "HPCCKPT_SITE_POLICY", "HPCCKPT_CATALOG", "HPCCKPT_CKPT_INTERVAL",
                "HPCCKPT_JOB_ID", "HPCCKPT_STORE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "store"


def make(coord: ThreadCoordinator, store: Path, **kw: Any) -> Checkpointer:
    return Checkpointer(coord, job_id="job7", store=store, install_signals=False,
                        **kw)


def rank_state(rank: int, step: int) -> dict[str, Any]:
    return {"step": step, "u": np.full(1000, rank + step / 7, dtype=np.float64), "tag": f"r{rank}"}


def committed(store: Path) -> list[Any]:
    cat = open_catalog(None, store, current_user())
    try:
        return cat.committed("job7")
    finally:
        cat.close()


def job_files(store: Path) -> list[str]:
    return sorted(os.listdir(store / current_user().name / "job7"))


def test_fresh_start_save_and_restore_each_rank_gets_its_own(store: Path) -> None:
    def first(c: ThreadCoordinator) -> Any:
        with make(c, store) as ck:
            assert ck.restore() is None
            return ck.save(rank_state(c.rank, 10))

    ids = ThreadGroup(3).run(first)
    assert ids[0] == ids[1] == ids[2] and isinstance(ids[0], int)
    assert [r.ckptid for r in committed(store)] == [ids[0]]
    assert job_files(store) == [f"ckpt-{ids[0]}.hck"] + [f"ckpt-{ids[0]}.r{r}.hck" for r in range(3)]

    def again(c: ThreadCoordinator) -> Any:
        with make(c, store) as ck:
            return ck.restore(), ck.last_ckptid

    for rank, (state, last) in enumerate(ThreadGroup(3).run(again)):
        assert last == ids[0]
        assert state["tag"] == f"r{rank}" and state["step"] == 10
        assert state["u"].tobytes() == rank_state(rank, 10)["u"].tobytes()


def test_one_rank_failing_commits_nothing_and_keeps_the_previous(store: Path) -> None:
    def run(c: ThreadCoordinator) -> Any:
        with make(c, store) as ck:
            first = ck.save(rank_state(c.rank, 1))
            bad = rank_state(c.rank, 2)
            if c.rank == 1:
                bad["oops"] = object()  # cannot be encoded: this rank's shard fails
            with pytest.raises(MPIError, match=r"rank 1: .*cannot encode object"):
                ck.save(bad)
            return first

    results = ThreadGroup(3).run(run)
    assert all(isinstance(r, int) for r in results), results
    first = results[0]
    assert [r.ckptid for r in committed(store)] == [first]
    cat = open_catalog(None, store, current_user())
    try:
        failed = [r for r in cat.list("job7") if r.ckptid != first]
    finally:
        cat.close()
    assert len(failed) == 1 and failed[0].status == Status.FAILED and "rank 1" in (failed[0].error or "")
    # No shard of the failed checkpoint is left, under a temp name or a final one.
    assert job_files(store) == [f"ckpt-{first}.hck"] + [f"ckpt-{first}.r{r}.hck" for r in range(3)]

    def again(c: ThreadCoordinator) -> Any:
        with make(c, store) as ck:
            return ck.restore()["step"]

    assert ThreadGroup(3).run(again) == [1, 1, 1]


def test_a_damaged_shard_makes_every_rank_fall_back(store: Path) -> None:
    def run(c: ThreadCoordinator) -> Any:
        with make(c, store) as ck:
            return ck.save(rank_state(c.rank, 1)), ck.save(rank_state(c.rank, 2))

    (old, new) = ThreadGroup(2).run(run)[0]
    shard = store / current_user().name / "job7" / f"ckpt-{new}.r1.hck"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    def again(c: ThreadCoordinator) -> Any:
        with make(c, store) as ck:
            return ck.restore()["step"], ck.last_ckptid

    # Rank 0's shard is fine, but it must not resume from a newer step than rank 1.
    assert ThreadGroup(2).run(again) == [(1, old), (1, old)]


def test_restart_with_another_rank_count_is_refused_unless_resharded(store: Path) -> None:
    def save3(c: ThreadCoordinator) -> Any:
        with make(c, store) as ck:
            return ck.save(rank_state(c.rank, 5))

    ThreadGroup(3).run(save3)

    def plain(c: ThreadCoordinator) -> Any:
        with make(c, store) as ck:
            return ck.restore()

    for err in ThreadGroup(2).run(plain):
        assert isinstance(err, MPIError)
        assert "taken with 3 ranks, this run has 2" in str(err) and "allow_resize" in (err.hint or "")

    def resharded(c: ThreadCoordinator) -> Any:
        def merge(resized: Resized) -> Any:
            assert (resized.old_size, resized.new_size) == (3, 2)
            mine = [r for r in range(resized.old_size) if r % resized.new_size == c.rank]
            return sorted(resized.load(r)["tag"] for r in mine)

        with make(c, store) as ck:
            return ck.restore(reshard=merge)

    assert ThreadGroup(2).run(resharded) == [["r0", "r2"], ["r1"]]

    def loose(c: ThreadCoordinator) -> Any:
        with make(c, store) as ck:
            got = ck.restore(allow_resize=True)
            assert isinstance(got, Resized)
            return [s["tag"] for s in got.all()]

    assert ThreadGroup(2).run(loose) == [["r0", "r1", "r2"]] * 2


def test_due_is_agreed_a_request_on_one_rank_reaches_all(store: Path) -> None:
    def run(c: ThreadCoordinator) -> Any:
        with make(c, store, interval=3600) as ck:
            before = ck.due()
            if c.rank == 2:
                ck._flag.raise_flag(15)  # as the signal handler does
            after = ck.due()
            stop = ck.stop_requested
            ck.save({"r": c.rank})
            return before, after, stop, ck.due()

    assert ThreadGroup(3).run(run) == [(False, True, True, False)] * 3


def test_interval_from_environment_and_bad_values(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCCKPT_CKPT_INTERVAL", "1h30m")
    with Checkpointer(job_id="j", store=store, install_signals=False) as ck:
        assert ck.interval == 5400
    monkeypatch.setenv("HPCCKPT_CKPT_INTERVAL", "soon")
    with pytest.raises(PolicyError, match="HPCCKPT_CKPT_INTERVAL: 'soon' is not an interval"):
        Checkpointer(job_id="j", store=store, install_signals=False)


def test_files_are_captured_and_put_back(store: Path, tmp_path: Path) -> None:
    restart = tmp_path / "out" / "restart.0001"
    restart.parent.mkdir()
    restart.write_bytes(b"restart data")
    os.chmod(restart, 0o640)
    with Checkpointer(job_id="job7", store=store, install_signals=False) as ck:
        ck.save({"n": 1}, files=[restart])
    restart.unlink()
    restart.parent.rmdir()
    with Checkpointer(job_id="job7", store=store, install_signals=False) as ck:
        assert ck.restore() == {"n": 1}
    assert restart.read_bytes() == b"restart data"
    assert restart.stat().st_mode & 0o777 == 0o640
