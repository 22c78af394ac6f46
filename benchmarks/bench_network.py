"""What a job's own network namespace costs: job start time and freeze time, private ÷ host.

    sudo .venv/bin/python benchmarks/bench_network.py [--repeat 5]

Alternately, in the same run, ``hpcckpt run`` starts the same small job (a
loopback TCP server and its client, tests/criu/progs/tcp_pair.py) with policy
``job.network: private`` (namespace, loopback up, slirp4netns attached
before the job execs) and ``job.network: host``, and takes checkpoints
every second. Measured per run:

* start: from ``hpcckpt run`` being started to the job's first line of output;
* freeze: the median ``frozen_s`` of its committed checkpoints (CRIU dumping from inside
  the namespace with --network-lock skip, against the host's nftables lock).

Printed: the medians of both and their ratios, private ÷ host.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIR = REPO / "tests" / "criu" / "progs" / "tcp_pair.py"


def one_run(mode: str, work: Path, n: int, checkpoints: int) -> tuple[float, float]:
    pol = work / f"{mode}.yaml"
    pol.write_text(f"job:\n  network: {mode}\n")
    env = dict(os.environ, HPCCKPT_STORE=str(work / "store"), HPCCKPT_STAGING=str(work / "staging"),
               HPCCKPT_LOG_FORMAT="json", PYTHONPATH=str(REPO))
    job = f"bench-{mode}-{n}"
    err = open(work / f"{job}.err", "w+")  # noqa: SIM115 - read back below
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "hpcckpt", "run", "--policy", str(pol), "--job-id", job,
                             "--interval", "1", "--", sys.executable, str(PAIR), str(7000 + n), "1000000", "0.02"],
                            stdout=subprocess.PIPE, stderr=err, env=env, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.readline()
    start = time.monotonic() - t0
    frozen: list[float] = []
    deadline = time.monotonic() + 60
    while len(frozen) < checkpoints and time.monotonic() < deadline:
        time.sleep(0.5)
        err.seek(0)
        frozen = [json.loads(ln)["frozen_s"] for ln in err if "\"checkpoint.committed\"" in ln]
    proc.terminate()  # a final checkpoint, then the job ends
    proc.wait(60)
    err.close()
    if len(frozen) < checkpoints:
        raise SystemExit(f"{mode}: only {len(frozen)} checkpoints; see {work / (job + '.err')}")
    return start, statistics.median(frozen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--checkpoints", type=int, default=4)
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"host": [], "private": []}
    with tempfile.TemporaryDirectory(prefix="bench-net-") as tmp:
        for i in range(args.repeat):
            for mode in ("host", "private") if i % 2 == 0 else ("private", "host"):
                results[mode].append(one_run(mode, Path(tmp), i * 2 + (mode == "private"), args.checkpoints))
    med = {m: (statistics.median(s for s, _ in r), statistics.median(f for _, f in r)) for m, r in results.items()}
    for m in ("host", "private"):
        print(f"{m:8s} start {med[m][0] * 1000:7.1f} ms   freeze {med[m][1] * 1000:7.1f} ms")
    print(f"job.network private ÷ host: start {med['private'][0] / med['host'][0]:.2f}, "
          f"freeze {med['private'][1] / med['host'][1]:.2f}  (median of {args.repeat} alternating runs each)")


if __name__ == "__main__":
    main()
