"""Holds SIZE MiB in a numpy array and updates it for STEPS steps; writes the sha256 of the result to OUT.

``numpy_job.py OUT SIZE_MIB STEPS [TICK]``. Deterministic: the same arguments give the same digest.
"""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np


def main() -> None:
    out, size_mib, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tick = float(sys.argv[4]) if len(sys.argv) > 4 else 0.2
    n = size_mib * (1 << 20) // 8
    a = np.arange(n, dtype=np.float64) * 1.000001
    stride = max(1, n // steps)
    for step in range(steps):
        lo = (step * stride) % n
        a[lo : lo + stride] = np.sqrt(a[lo : lo + stride] + step)
        a[::4096] += step * 0.5
        print(step, flush=True)
        time.sleep(tick)
    digest = hashlib.sha256(a.tobytes()).hexdigest()
    with open(out, "w") as fh:
        fh.write(digest + "\n")


if __name__ == "__main__":
    main()
