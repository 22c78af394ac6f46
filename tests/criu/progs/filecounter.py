"""Counts from 0 into a file (one line per tick, flushed): progress a test can read while the job runs."""

from __future__ import annotations

import sys
import time


def main() -> None:
    path, tick = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    with open(path, "a", buffering=1) as out:
        i = 0
        while True:
            out.write(f"{i}\n")
            i += 1
            time.sleep(tick)


if __name__ == "__main__":
    main()
