"""How long hpcckpt freezes a job, against a raw ``criu dump`` of the same process.

    sudo .venv/bin/python benchmarks/bench_checkpoint.py --sizes 256,1024 [--repeat 2] [--staging DIR]

For each size, one process holding that many MiB of numpy data is started in
its own PID namespace (as ``hpcckpt run`` does), then, alternately:

* raw: ``criu dump --leave-running`` into the staging dir (CRIU's own freeze);
* hpcckpt: the full pipeline (/proc read while the job runs, dump
  --leave-running, open files' sizes from CRIU's images, then pack + publish +
  commit while the job runs).

Printed: the job's frozen time under hpcckpt ÷ the raw dump time, and the
end-to-end checkpoint time (and its ratio to the raw dump), all from this run.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.core.checkpoint import CriuCheckpointer, JobInfo
from hpcckpt.core.launch.spawn import StdioPipes, spawn_in_pid_namespace
from hpcckpt.core.pipeline.flush import FlushSettings, StorePublisher
from hpcckpt.criu.engine import Criu
from hpcckpt.criu.interface import DumpOptions
from hpcckpt.jobid import resolve
from hpcckpt.store.images import Store

HOLDER = """
import sys, time, numpy as np
a = np.arange(int(sys.argv[1]) * (1 << 17), dtype=np.float64) * 1.0001
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def start_holder(mib: int, pipes: StdioPipes) -> int:
    pid = spawn_in_pid_namespace([sys.executable, "-c", HOLDER, str(mib)], env=dict(os.environ), cwd="/",
                                 pipes=pipes)
    buf = b""
    while b"ready" not in buf:
        buf += os.read(pipes.out_r, 100)
    return pid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024", help="MiB, comma-separated (default 256,1024)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--staging", default=None, help="where dumps go (default: a temp dir under /var/tmp)")
    ap.add_argument("--codec", default="none", choices=("none", "zstd", "lz4"))
    args = ap.parse_args()
    criu = Criu.locate()
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.staging or "/var/tmp"))
    user = current_user()
    print(f"criu {criu.version()} at {criu.path}; work dir {work}; codec {args.codec}")
    print(f"{'MiB':>6} {'raw dump s':>11} {'frozen s':>9} {'frozen/raw':>11} {'end-to-end s':>13} "
          f"{'e2e/raw':>8} {'image MiB':>10}")
    try:
        for mib in [int(s) for s in args.sizes.split(",")]:
            pipes = StdioPipes.create()
            pid = start_holder(mib, pipes)
            pipes.close_write_ends()
            store_root = work / f"store-{mib}"
            cat = open_catalog(None, store_root, user)
            job = JobInfo(identity=resolve(f"bench{mib}", {}), user=user, cmdline=["holder"], cwd="/",
                          stdio=dict(pipes.resources), interval=None)
            (work / "stage").mkdir(exist_ok=True)
            store = Store(store_root, user)
            # Full images every time (each is deleted after timing), staged on the same disk
            # directory the raw dump uses, so the two are compared like for like.
            ck = CriuCheckpointer(engine=criu, store=store, catalog=cat, job=job, options=DumpOptions(),
                              flush=FlushSettings(codec=args.codec, incremental=False),
                              publisher=StorePublisher(store, functools.partial(open_catalog, None, store_root, user)),
                              disk_staging=work / "stage", tmpfs=None)
            raw, frozen, total, size = [], [], [], 0
            for i in range(args.repeat):
                d = work / f"raw-{mib}-{i}"
                d.mkdir()
                raw.append(criu.dump(pid, d, options=DumpOptions(), after="running").frozen_s)
                shutil.rmtree(d)
                res = ck.checkpoint(pid)
                frozen.append(res.frozen_s)
                total.append(res.total_s)
                size = res.size_bytes
                res.path.unlink()
            r, f, t = statistics.median(raw), statistics.median(frozen), statistics.median(total)
            print(f"{mib:>6} {r:>11.3f} {f:>9.3f} {f / r:>11.2f} {t:>13.3f} {t / r:>8.2f} {size / 2**20:>10.1f}")
            ck.finish(30)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(pipes.out_r)
            os.close(pipes.err_r)
            cat.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
