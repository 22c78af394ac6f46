"""The runner with the storage pipeline, in-process, against a real CRIU and a real store.

The store is the real one; only its speed is controlled: a publisher that
holds each publish at a gate the test opens (injected through
``run_job(publisher=...)``, the adapter the runner takes its publisher
from). The job is a real process that counts into a file, so "the job runs
on while its image is flushed" is measured by the count advancing.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcckpt.catalog import Catalog, Status, open_catalog
from hpcckpt.context import current_user
from hpcckpt.core.pipeline.flush import StorePublisher, Write
from hpcckpt.core.pipeline.staging import StagedCheckpoint
from hpcckpt.core.runner.control import request
from hpcckpt.core.runner.session import Environment, SessionOptions, run_job
from hpcckpt.exitcodes import EXIT_REQUEUE
from tests.criu.harness import PROGS, wait_for

pytestmark = [pytest.mark.criu, pytest.mark.timeout(180, method="thread")]
COUNTER = str(PROGS / "filecounter.py")


class SlowStore(StorePublisher):
    """The real store publisher; publishes after the first ``free`` wait at a gate until it is opened."""

    def __init__(self, env: Environment, free: int = 0) -> None:
        url = env.catalog_url
        super().__init__(env.store, lambda: open_catalog(url, env.store_root, env.user))
        self.free = free
        self.gate = threading.Event()
        self.held = threading.Semaphore(0)  # released each time a publish starts waiting
        self.publishes = 0

    def publish(self, staged: StagedCheckpoint, parent: int | None, write: Write) -> tuple[int, Path]:
        self.publishes += 1
        if self.publishes > self.free:
            self.held.release()
            self.gate.wait(120)
        return super().publish(staged, parent, write)


@pytest.fixture
def env(work: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HPCCKPT_STORE", str(work / "store"))
    monkeypatch.setenv("HPCCKPT_STAGING", str(work / "staging"))
    monkeypatch.chdir(work)
    yield work


def policy(work: Path, **pipeline: Any) -> str:
    lines = ["pipeline:"] + [f"  {k}: {v}" for k, v in pipeline.items()]
    lines += ["storage:", "  compression:", "    codec: lz4"]
    # These tests are about the flush pipeline chaining each image on the one before; the rule that
    # keeps a full fallback outside the chain (and so makes a job's 2nd image full) is tested in
    # test_safe_resume.py and tests/pipeline/test_fallback_chain.py.
    lines += ["retention:", "  fallback_full: false"]
    path = work / "policy.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def count(path: Path) -> int:
    lines = path.read_text().split() if path.exists() else []
    return int(lines[-1]) if lines else -1


def status(job: str) -> dict[str, Any]:
    return request(job, {"op": "status"}, timeout=10)


def stage_dirs(job: str) -> list[Path]:
    user = current_user().name
    roots = [Path("/dev/shm/hpcckpt-staging") / user / job, Path(os.environ["HPCCKPT_STAGING"]) / user / job]
    return [p for r in roots if r.is_dir() for p in r.iterdir() if p.name.startswith("stage-")]


def committed(work: Path, job: str) -> list[Any]:
    cat: Catalog = open_catalog(None, work / "store", current_user())
    try:
        return [r for r in cat.list(job) if r.status is Status.COMMITTED]
    finally:
        cat.close()


@pytest.mark.parametrize("on_busy", ["skip", "queue"])
def test_job_runs_on_while_a_slow_flush_is_in_flight(env: Path, on_busy: str) -> None:
    """A held publish: the job keeps counting, later checkpoints are skipped or one is queued, nothing piles up."""
    job, out = f"slow-{on_busy}", env / "count.txt"
    opts = SessionOptions(policy=policy(env, on_busy=on_busy), interval="1", deadline=60)
    holder: dict[str, SlowStore] = {}
    seen: dict[str, Any] = {}

    def script() -> None:
        st = holder["s"]
        assert st.held.acquire(timeout=60), "no checkpoint reached the store"
        n0 = count(out)
        time.sleep(3.5)  # three more intervals pass while the first flush is held
        seen["advanced"] = count(out) - n0
        seen["status"] = status(job)
        seen["staged"] = len(stage_dirs(job))
        st.gate.set()
        wait_for(lambda: len(committed(env, job)) >= (2 if on_busy == "queue" else 1), 60, "the flushes")
        os.kill(os.getpid(), signal.SIGTERM)

    def make(e: Environment) -> SlowStore:
        return holder.setdefault("s", SlowStore(e))

    errors: list[BaseException] = []

    def body() -> None:
        try:
            wait_for(lambda: "s" in holder, 30, "the runner")
            script()
        except BaseException as exc:
            errors.append(exc)
            if "s" in holder:
                holder["s"].gate.set()
            os.kill(os.getpid(), signal.SIGTERM)

    th = threading.Thread(target=body, daemon=True)
    th.start()
    code = run_job([sys.executable, COUNTER, str(out), "0.05"], opts, job_id=job, publisher=make)
    th.join(30)
    assert not errors, errors
    assert code == EXIT_REQUEUE
    assert seen["advanced"] >= 30, f"the job counted only {seen['advanced']} in 3.5 s while its image was flushed"
    st = seen["status"]
    if on_busy == "skip":
        assert st["skipped"] >= 2 and len(st["in_flight"]) == 1 and seen["staged"] == 1
    else:
        assert st["skipped"] >= 1 and len(st["in_flight"]) == 2 and seen["staged"] == 2
    rows = committed(env, job)
    assert len(rows) == (3 if on_busy == "queue" else 2)  # the flushed ones and the final one
    # the 2nd is incremental on the 1st; later ones too, unless pipeline.max_chain_ratio started afresh
    assert rows[1].parent == rows[0].ckptid
    assert all(r.parent in (None, prev.ckptid) for prev, r in itertools.pairwise(rows))
    assert stage_dirs(job) == []


def test_final_checkpoint_waits_for_the_flush_in_flight_then_commits(env: Path) -> None:
    """SIGTERM while a periodic flush is held: the final image is queued behind it and committed in time."""
    job, out = "final-ok", env / "count.txt"
    opts = SessionOptions(policy=policy(env), interval="1", deadline=30)
    holder: dict[str, SlowStore] = {}
    errors: list[BaseException] = []
    t_term: list[float] = []

    def body() -> None:
        try:
            wait_for(lambda: "s" in holder, 30, "the runner")
            st = holder["s"]
            assert st.held.acquire(timeout=60)
            t_term.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the publish is in flight
            time.sleep(1.5)
            st.gate.set()
        except BaseException as exc:
            errors.append(exc)
            if "s" in holder:
                holder["s"].gate.set()

    th = threading.Thread(target=body, daemon=True)
    th.start()
    code = run_job([sys.executable, COUNTER, str(out), "0.05"], opts, job_id=job,
                   publisher=lambda e: holder.setdefault("s", SlowStore(e)))
    took = time.monotonic() - t_term[0]
    th.join(10)
    assert not errors, errors
    assert code == EXIT_REQUEUE and took < 30
    rows = committed(env, job)
    assert len(rows) == 2
    assert rows[-1].parent == rows[0].ckptid  # the final one is incremental on the flushed one
    assert stage_dirs(job) == []


def test_final_checkpoint_past_its_deadline_leaves_the_previous_image_latest(env: Path) -> None:
    """The store hangs: the final checkpoint gives up at the deadline counted from SIGTERM's arrival."""
    job, out = "final-late", env / "count.txt"
    opts = SessionOptions(policy=policy(env), interval="1", deadline=4)
    holder: dict[str, SlowStore] = {}
    errors: list[BaseException] = []
    t_term: list[float] = []

    def body() -> None:
        try:
            wait_for(lambda: "s" in holder, 30, "the runner")
            st = holder["s"]
            assert st.held.acquire(timeout=60)  # the 2nd checkpoint's publish hangs
            t_term.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException as exc:
            errors.append(exc)
            os.kill(os.getpid(), signal.SIGTERM)

    th = threading.Thread(target=body, daemon=True)
    th.start()
    code = run_job([sys.executable, COUNTER, str(out), "0.05"], opts, job_id=job,
                   publisher=lambda e: holder.setdefault("s", SlowStore(e, free=1)))
    took = time.monotonic() - t_term[0]
    th.join(10)
    assert not errors, errors
    first = committed(env, job)
    holder["s"].gate.set()  # let the stuck worker go: it must not commit anything now
    time.sleep(1.0)
    assert code == EXIT_REQUEUE  # an older image exists
    assert took < 4 + 3, f"the runner took {took:.1f} s after SIGTERM with a 4 s deadline"
    assert len(first) == 1 and [r.ckptid for r in committed(env, job)] == [first[0].ckptid]
    assert stage_dirs(job) == []  # no epilog outside Slurm: nothing left to go stale
    n = count(out)
    time.sleep(0.5)
    assert count(out) == n, "the job was not ended"
