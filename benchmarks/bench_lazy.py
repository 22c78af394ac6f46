"""Lazy restore against the streamed restore and raw CRIU, at several job sizes, in one run.

    sudo .venv/bin/python -m benchmarks.bench_lazy [--sizes 1024,4096] [--store DIR] [--codec none]

For each size (MiB of private anonymous memory, all of it touched), a numpy
job is checkpointed by the runner's own CriuCheckpointer into a store and
dumped by raw ``criu dump`` into a plain directory. Then, each from a cold
page cache, side by side (target in brackets):

1. time from ``hpcckpt resume`` (the real CLI, a new process) to the job's
   next progress (a heartbeat file it writes every 5 ms), lazy restore /
   raw ``criu restore -d`` from the plain directory to the same heartbeat
   [<= 0.25 at 4 GiB, and flat as size grows];
2. time from ``hpcckpt resume`` until all pages are resident, lazy
   (``lazy.resident``) / streamed (``resume.restored``, restore.lazy: off)
   [<= 1.2];
3. the job's throughput (MiB of its memory swept per second) in its first
   10 s after a lazy restore / after a streamed (fully restored) one. For
   this the job is switched (SIGUSR1) to sweeping its whole memory, 1 MiB
   at a time, and checkpointed again.

Needs root, CRIU and numpy. The machine is small and shared: read the
ratios against the load average printed at the start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_pipeline import criu_raw, drop_caches, kill_and_wait, load, spawn
from hpcckpt.catalog import open_catalog
from hpcckpt.context import User, current_user
from hpcckpt.core.checkpoint import CriuCheckpointer, JobInfo
from hpcckpt.core.pipeline.flush import FlushSettings, StorePublisher
from hpcckpt.criu.engine import Criu
from hpcckpt.criu.interface import DumpOptions
from hpcckpt.jobid import JobIdentity
from hpcckpt.store.images import Store

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]

JOB = """
import os, signal, sys, time
import numpy as np
size, beat = int(sys.argv[1]) << 20, sys.argv[2]
a = np.arange(size // 8, dtype=np.float64)
a *= 1.0000001
blk = (1 << 20) // 8
nblk = a.size // blk
sweep = [False]
def go(*_):
    sweep[0] = True
signal.signal(signal.SIGUSR1, go)
n = done = i = 0
last = 0.0
while True:
    if sweep[0]:
        a[i * blk:(i + 1) * blk].sum()
        i = (i + 1) % nblk
        done += 1
    else:
        time.sleep(0.002)
    n += 1
    now = time.monotonic()
    if now - last >= 0.005:
        last = now
        with open(beat + ".tmp", "w") as f:
            f.write(f"{n} {done}")
        os.replace(beat + ".tmp", beat)
"""


def read_beat(beat: Path) -> tuple[int, int] | None:
    try:
        n, done = beat.read_text().split()
        return int(n), int(done)
    except (OSError, ValueError):
        return None


def wait_progress(beat: Path, timeout: float = 300, resume: Resume | None = None) -> float:
    """Monotonic time at which the restored job first wrote its heartbeat (the file was removed before).

    With ``resume``: fails at once, with its log, if that ``hpcckpt resume`` ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if read_beat(beat) is not None:
            return time.monotonic()
        if resume is not None and resume.proc.poll() is not None:
            raise RuntimeError(f"hpcckpt resume ended ({resume.proc.returncode}) before the job made progress: "
                               + resume.err.read_text()[-3000:])
        time.sleep(0.001)
    raise RuntimeError("the restored job made no progress"
                       + (": " + resume.err.read_text()[-3000:] if resume is not None else ""))


def checkpointer(criu: Criu, store: Store, me: User, job_id: str, staging: Path, codec: str) -> CriuCheckpointer:
    job = JobInfo(identity=JobIdentity(job_id, "cli"), user=me, cmdline=["bench"], cwd="/", stdio={}, interval=None)
    pub = StorePublisher(store, lambda: open_catalog(None, store.root, me))
    return CriuCheckpointer(engine=criu, store=store, catalog=open_catalog(None, store.root, me), job=job,
                        options=DumpOptions(), flush=FlushSettings(codec=codec, chunk_size=4 * MiB),
                        publisher=pub, disk_staging=staging)


class Resume:
    """One ``hpcckpt resume`` through the real CLI, with its JSON log."""

    def __init__(self, work: Path, store: Path, job: str, ckptid: int, lazy: str) -> None:
        pol = work / f"lazy-{lazy}.yaml"
        pol.write_text(f"restore:\n  lazy: \"{lazy}\"\njob:\n  network: host\n")
        self.err = work / f"resume-{lazy}-{ckptid}.err"
        env = dict(os.environ, HPCCKPT_LOG_FORMAT="json", HPCCKPT_STORE=str(store), PYTHONPATH=str(REPO))
        self.wall0 = time.time()
        self.t0 = time.monotonic()
        with open(self.err, "wb") as e:
            self.proc = subprocess.Popen([sys.executable, "-m", "hpcckpt", "resume", job, "--ckpt", str(ckptid),
                                          "--interval", "100000", "--policy", str(pol)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=e, env=env)

    def event(self, name: str, timeout: float = 300) -> dict[str, object]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.err.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    doc = json.loads(line)
                    if doc.get("event") == name:
                        return dict(doc)
            if self.proc.poll() is not None:
                raise RuntimeError(f"hpcckpt resume ended ({self.proc.returncode}) without {name}: "
                                   + self.err.read_text()[-2000:])
            time.sleep(0.02)
        raise RuntimeError(f"no {name} in time")

    def since_start(self, doc: dict[str, object]) -> float:
        """Seconds from the resume's start to a logged event (its wall-clock stamp, ms resolution)."""
        ts = str(doc["ts"]).replace("Z", "+00:00")
        from datetime import datetime

        return datetime.fromisoformat(ts).timestamp() - self.wall0

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            pid = int(str(self.event("resume.restored", 5)["pid"]))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(60)
        time.sleep(0.5)  # the job's memory is freed after its runner reaped it


def row(name: str, ours: float, base: float, unit: str, target: str, higher_better: bool = False) -> None:
    ratio = ours / base if base else float("inf")
    ok = ratio >= float(target[2:]) if higher_better else ratio <= float(target[2:])
    print(f"  {name:<58} {ours:9.3f} {unit:<6} base {base:9.3f} {unit:<6} ratio {ratio:6.3f} "
          f"[{target}] {'ok' if ok else 'MISSED'}", flush=True)


def measure(size: int, args: argparse.Namespace, criu: Criu, me: User, work: Path) -> None:
    store_root = Path(args.store)
    shutil.rmtree(store_root, ignore_errors=True)
    store = Store(store_root, me)
    job_id = f"lazy{size}"
    ck = checkpointer(criu, store, me, job_id, Path(args.staging), args.codec)
    beat = work / f"beat-{size}"
    outer, pid = spawn(JOB, str(size), str(beat))
    raw = work / f"raw-{size}"
    try:
        wait_progress(beat, 600)
        idle = ck.checkpoint(pid)
        raw.mkdir()
        criu_raw(criu, "dump", "-t", str(pid), "-D", str(raw), "-o", "d.log", "--leave-running")
        os.kill(pid, signal.SIGUSR1)
        time.sleep(1.0)
        sweeping = ck.checkpoint(pid)
    finally:
        kill_and_wait(pid)
        outer.wait(60)
    print(f"{size} MiB: images {idle.ckptid} (idle job) and {sweeping.ckptid} (sweeping, parent {sweeping.parent}); "
          f"load {load()}", flush=True)

    # 1. next progress: raw criu restore from the plain directory vs lazy hpcckpt resume
    beat.unlink(missing_ok=True)
    drop_caches()
    t0 = time.monotonic()
    pidfile = raw / "restored.pid"
    criu_raw(criu, "restore", "-D", str(raw), "-o", "restore.log", "-d", "--pidfile", str(pidfile))
    t_raw_exit = time.monotonic() - t0
    t_raw = wait_progress(beat) - t0
    kill_and_wait(int(pidfile.read_text()))
    shutil.rmtree(raw)

    results: dict[str, dict[str, float]] = {}
    for lazy in ("on", "off"):
        beat.unlink(missing_ok=True)
        drop_caches()
        res = Resume(work, store_root, job_id, idle.ckptid, lazy)
        try:
            progress = wait_progress(beat, resume=res) - res.t0
            done = res.event("lazy.resident" if lazy == "on" else "resume.restored")
            results[lazy] = {"progress": progress, "resident": res.since_start(done)}
        finally:
            res.stop()
    print(f"  (raw criu restore exits after {t_raw_exit:.3f} s; streamed resume's next progress after "
          f"{results['off']['progress']:.3f} s)")
    row("1. resume -> next progress, lazy / raw criu restore", results["on"]["progress"], t_raw, "s", "<=0.25")
    row("2. all pages resident, lazy / streamed restore", results["on"]["resident"], results["off"]["resident"],
        "s", "<=1.2")

    # 3. throughput of the sweeping job in its first --window seconds after the restore
    rates = {}
    for lazy in ("on", "off"):
        beat.unlink(missing_ok=True)
        drop_caches()
        res = Resume(work, store_root, job_id, sweeping.ckptid, lazy)
        try:
            wait_progress(beat, resume=res)
            first = read_beat(beat)
            t1 = time.monotonic()
            time.sleep(args.window)
            last = read_beat(beat)
            dt = time.monotonic() - t1
            assert first is not None and last is not None
            rates[lazy] = (last[1] - first[1]) / dt
        finally:
            res.stop()
    row(f"3. throughput in the first {args.window:g} s, lazy / fully restored", rates["on"], rates["off"], "MiB/s",
        ">=0.0", higher_better=True)
    shutil.rmtree(store_root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,4096", help="job sizes in MiB, comma-separated (default 1024,4096)")
    ap.add_argument("--store", default="/var/tmp/hpcckpt-bench-lazy", help="store root")
    ap.add_argument("--staging", default="/var/tmp/hpcckpt-bench-lazy-staging", help="node-local disk staging")
    ap.add_argument("--codec", default="none", help="storage.compression.codec of the images (default none)")
    ap.add_argument("--window", type=float, default=10.0, help="seconds of throughput measured in 3 (default 10)")
    args = ap.parse_args(argv)
    criu = Criu.locate()
    me = current_user()
    work = Path(tempfile.mkdtemp(prefix="bench-lazy-"))
    print(f"sizes {args.sizes} MiB; store {args.store}; codec {args.codec}; criu {criu.version()}; "
          f"load average {load()} (2 cores are shared: read ratios against it)", flush=True)
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            measure(size, args, criu, me, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
