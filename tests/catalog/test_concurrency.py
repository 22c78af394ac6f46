"""Many writer processes at once, and writers killed with SIGKILL mid-publish, on both backends."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcckpt.catalog import Catalog, Status
from hpcckpt.context import User
from hpcckpt.store.check import check_consistency
from hpcckpt.store.gc import collect_garbage
from hpcckpt.store.images import PUBLISH_STEPS, Store

REPO = Path(__file__).resolve().parents[2]
WRITERS = 32
COMMITS = 50


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.catalog._worker", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HPCCKPT_LOG_FORMAT": "json"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_32_writers_50_commits_each(cat: Catalog, catalog_url: str | None, store_root: Path) -> None:
    url = catalog_url or "-"
    procs = [
        subprocess.Popen(_worker("commits", str(store_root), url, f"job{i % 4}", str(COMMITS)),
                         cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(WRITERS)
    ]
    ids: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=800)
        assert p.returncode == 0, err[-3000:]
        assert "database is locked" not in err and "locked" not in out
        ids.extend(json.loads(out))
    assert len(ids) == WRITERS * COMMITS
    assert len(set(ids)) == len(ids) and min(ids) > 0
    rows = cat.list()
    assert {r.ckptid for r in rows} == set(ids)  # no record lost, none extra
    assert all(r.status is Status.COMMITTED for r in rows)
    for job in ("job0", "job1", "job2", "job3"):
        latest = cat.latest(job)
        assert latest is not None and latest.ckptid == max(r.ckptid for r in rows if r.job_id == job)
    assert check_consistency(cat, Store(store_root, cat.user)) == []


@pytest.mark.slow
@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_sigkill_at_each_publish_step(
    cat: Catalog, catalog_url: str | None, store_root: Path, me: User, step: str
) -> None:
    store = Store(store_root, me)
    with store.publish(cat, job_id="77", engine="files", node="n") as prev:
        prev.file.write(b"previous image")
    proc = subprocess.run(_worker("crash", str(store_root), catalog_url or "-", "77", step),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    latest = cat.latest("77")
    assert latest is not None
    if step == "committed":
        assert latest.ckptid > prev.ckptid  # killed after commit: the new image counts
    else:
        assert latest.ckptid == prev.ckptid  # the previous image is still the latest
        assert Path(latest.path).read_bytes() == b"previous image"
    # What is left is only a dead writer's leftovers, never a committed row without its image.
    kinds = {f.kind for f in check_consistency(cat, store)}
    assert kinds <= {"writing", "temp_file", "uncommitted_image"}, kinds

    report = collect_garbage(cat, store, None, grace=0.0)
    assert report.errors == []
    assert check_consistency(cat, store) == []
    assert all(r.status in (Status.COMMITTED, Status.FAILED) for r in cat.list("77"))
    after = cat.latest("77")
    assert after is not None and after.ckptid == latest.ckptid


@pytest.mark.slow
def test_sigkill_at_random_moments(cat: Catalog, catalog_url: str | None, store_root: Path, me: User) -> None:
    """Kills land inside SQLite transactions, journal writes and renames, not only at our hooks."""
    store = Store(store_root, me)
    rng = random.Random(4242)
    for _ in range(6):
        p = subprocess.Popen(_worker("loop", str(store_root), catalog_url or "-", "r"),
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    collect_garbage(cat, store, None, grace=0.0)
    assert check_consistency(cat, store) == []
    committed = cat.committed("r")
    assert committed, "some publishes must have completed"
    for rec in committed:
        assert Path(rec.path).stat().st_size == rec.size_bytes == 65536
