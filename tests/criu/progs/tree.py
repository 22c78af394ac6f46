"""A parent, 3 children fed through pipes, a thread pool, and an output file appended step by step.

``tree.py OUT STEPS [TICK]``: the final content of OUT depends only on STEPS,
so an interrupted-and-restored run must leave exactly what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def child(rd: int, wr: int, k: int) -> None:
    with os.fdopen(rd, "r") as inp, os.fdopen(wr, "w") as out:
        for line in inp:
            # An explicit end: later children hold copies of earlier children's pipes, so no EOF comes.
            if line.strip() == "end":
                break
            x = int(line)
            out.write(f"{(x * x + k) % 1000003}\n")
            out.flush()
    os._exit(0)


def main() -> None:
    path, steps = sys.argv[1], int(sys.argv[2])
    tick = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
    kids = []
    for k in range(3):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(to_w)
            os.close(from_r)
            child(to_r, from_w, k)
        os.close(to_r)
        os.close(from_w)
        kids.append((pid, os.fdopen(to_w, "w"), os.fdopen(from_r, "r")))
    pool = ThreadPoolExecutor(max_workers=4)
    with open(path, "a") as out:
        for step in range(steps):
            parts = []
            for _pid, w, r in kids:
                w.write(f"{step}\n")
                w.flush()
                parts.append(int(r.readline()))
            digests = list(pool.map(lambda v: hashlib.sha256(str(v).encode()).hexdigest()[:8], parts))
            out.write(f"{step} {' '.join(map(str, parts))} {' '.join(digests)}\n")
            out.flush()
            print(step, flush=True)
            time.sleep(tick)
    for pid, w, r in kids:
        w.write("end\n")
        w.close()
        r.close()
        os.waitpid(pid, 0)
    pool.shutdown()


if __name__ == "__main__":
    main()
