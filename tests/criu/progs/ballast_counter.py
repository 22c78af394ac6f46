"""Counts from 0 on stdout like counter.py, holding MIB MiB of random bytes that never change.

The unchanged memory makes a job's incremental images really depend on their
chain's full image (they refer to its chunks instead of storing them again).
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    mib, tick = int(sys.argv[1]), float(sys.argv[2])
    ballast = os.urandom(mib << 20)
    i = 0
    while True:
        print(i, flush=True)
        i += 1
        time.sleep(tick)
        if not ballast:
            break


if __name__ == "__main__":
    main()
