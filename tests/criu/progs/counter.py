"""Counts from 0, one line per tick, on stdout: a job whose progress is easy to check after a restore."""

from __future__ import annotations

import sys
import time


def main() -> None:
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 10**9
    tick = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
    for i in range(limit):
        print(i, flush=True)
        time.sleep(tick)


if __name__ == "__main__":
    main()
