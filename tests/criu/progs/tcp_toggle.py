"""Counts like counter.py; while the file ARGV[1] exists, holds a TCP connection to ARGV[3]:ARGV[4].

That peer is outside the job, so under policy ``job.external_connections:
skip`` creating the file makes checkpoints fail for real, and removing it
makes them work again. The program writes ARGV[1].state ("on"/"off") once it has
switched, so a test knows when the next checkpoint will fail.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def main() -> None:
    flag, tick, host, port = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    held: list[socket.socket] = []
    i = 0
    while True:
        want = os.path.exists(flag)
        if want and not held:
            held = [socket.create_connection((host, port), timeout=10)]
        elif not want and held:
            for s in held:
                s.close()
            held = []
        state = "on" if held else "off"
        tmp = f"{flag}.state.tmp"
        with open(tmp, "w") as fh:
            fh.write(state)
        os.replace(tmp, f"{flag}.state")
        print(i, flush=True)
        i += 1
        time.sleep(tick)


if __name__ == "__main__":
    main()
