"""Catalog throughput and lookup latency, SQLite and PostgreSQL.

    .venv/bin/python benchmarks/bench_catalog.py                 # small default run (~1 min)
    .venv/bin/python benchmarks/bench_catalog.py --full          # latest() over 1,000,000 rows
    .venv/bin/python benchmarks/bench_catalog.py --backend sqlite --writers 1,8,32 --commits 50

Commits/s: W writer processes, each opening its own catalog and doing
``begin`` + ``commit`` (one checkpoint = two write transactions) as fast as it
can; the rate is checkpoints committed per second of wall time, all writers
together. The baseline is 1 writer, measured in the same run.

Lookup: ``latest(job)`` for random jobs in a catalog of N committed rows
(50 per job); the baseline is the same lookup over 1,000 rows in the same
run, so the ratio shows how latency grows with the table.

PostgreSQL runs on a throwaway server (tests/pgserver.py) on this machine.
Numbers depend on the disk and the cores; compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcckpt.catalog import CkptRecord, Status, open_catalog
from hpcckpt.context import current_user

ROWS_PER_JOB = 50


def _writer(url: str | None, root: str, n: int, job: str, ready: Any, go: Any, out: Any) -> None:
    user = current_user()
    cat = open_catalog(url, Path(root), user)
    ready.release()
    go.wait()
    for _ in range(n):
        ck = cat.begin(job_id=job, uid=user.uid, user=user.name, node="bench", engine="criu")
        cat.commit(ck, path=f"/bench/{ck}", size_bytes=1 << 20, duration=0.1)
    cat.close()
    out.put(n)


def commits_per_second(url: str | None, root: Path, writers: int, commits: int) -> float:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, str(root), commits, f"w{i}", ready, go, out))
             for i in range(writers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()  # every writer has opened its catalog: time only the commits
    t0 = time.perf_counter()
    go.set()
    done = sum(out.get() for _ in procs)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"writer exited with {p.exitcode}")
    return done / elapsed


def fill(url: str | None, root: Path, rows: int) -> None:
    user = current_user()
    cat = open_catalog(url, root, user)
    now = time.time()
    batch: list[CkptRecord] = []
    for i in range(1, rows + 1):
        batch.append(CkptRecord(ckptid=i, job_id=f"job{(i - 1) // ROWS_PER_JOB}", uid=user.uid, user=user.name,
                                node="bench", path=f"/bench/{i}", size_bytes=1 << 20, engine="criu",
                                status=Status.COMMITTED, created=now, finished=now, duration=0.1))
        if len(batch) == 50_000:
            cat.insert_records(batch)
            batch = []
    cat.insert_records(batch)
    cat.close()


def lookup_latency(url: str | None, root: Path, rows: int, lookups: int) -> tuple[float, float]:
    """(median, p99) of latest() in microseconds, from a fresh connection."""
    cat = open_catalog(url, root, current_user())
    jobs = max(1, rows // ROWS_PER_JOB)
    rng = random.Random(1)
    times = []
    for _ in range(lookups):
        job = f"job{rng.randrange(jobs)}"
        t0 = time.perf_counter()
        rec = cat.latest(job)
        times.append((time.perf_counter() - t0) * 1e6)
        assert rec is not None and rec.job_id == job
    cat.close()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


@contextmanager
def backend(name: str, pg: Any) -> Iterator[tuple[str | None, Path]]:
    """A fresh, empty catalog: (url, store root)."""
    base = Path(tempfile.mkdtemp(prefix="hpcckpt-bench-"))
    try:
        if name == "sqlite":
            yield None, base
        else:
            yield pg.create_database(f"bench_{int(time.time() * 1e6)}"), base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(name: str, args: argparse.Namespace, pg: Any) -> None:
    print(f"\n== {name} ==")
    writers = [int(w) for w in args.writers.split(",")]
    base_rate: float | None = None
    rate = 0.0
    for w in writers:
        with backend(name, pg) as (url, root):
            rate = commits_per_second(url, root, w, args.commits)
        base_rate = base_rate or rate
        print(f"commits/s  writers={w:<3} {rate:9.0f} /s   x{rate / base_rate:5.2f} vs 1 writer"
              f"   ({w}x{args.commits} checkpoints)")
    # The figure the catalog must reach at scale (docs/catalog.md, "Measured").
    print(f"ratio      writers={writers[-1]:<3} {rate:9.0f} /s   x{rate / args.target:5.2f} vs the target of "
          f"{args.target:.0f} commits/s")
    base_lat: float | None = None
    for rows in (1_000, args.rows):
        with backend(name, pg) as (url, root):
            t0 = time.perf_counter()
            fill(url, root, rows)
            fill_s = time.perf_counter() - t0
            med, p99 = lookup_latency(url, root, rows, args.lookups)
        base_lat = base_lat or med
        print(f"latest()   rows={rows:<9} median {med:8.1f} us  p99 {p99:8.1f} us   x{med / base_lat:5.2f} "
              f"vs 1,000 rows   (fill {fill_s:.1f}s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--writers", default="1,8,32", help="comma-separated writer counts (default 1,8,32)")
    ap.add_argument("--commits", type=int, default=30, help="checkpoints per writer (default 30)")
    ap.add_argument("--rows", type=int, default=20_000, help="catalog size for the lookup test")
    ap.add_argument("--full", action="store_true", help="lookup over 1,000,000 rows")
    ap.add_argument("--lookups", type=int, default=2_000)
    ap.add_argument("--target", type=float, default=500.0,
                    help="commits/s the most writers should reach (default 500, for 32 writers)")
    args = ap.parse_args()
    if args.full:
        args.rows = 1_000_000
    names = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    pg = None
    if "postgresql" in names:
        from tests.pgserver import PgServer

        pg = PgServer().start()
    try:
        for name in names:
            run(name, args, pg)
    finally:
        if pg is not None:
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
