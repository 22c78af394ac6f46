"""Connects to HOST:PORT outside the job and sends 0, 1, 2, ...; prints each number sent, or
``closed ERRNO`` (and exits) once the connection fails."""

from __future__ import annotations

import socket
import sys
import time


def main() -> None:
    host, port, tick = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    c = socket.create_connection((host, port), timeout=10)
    c.settimeout(None)
    i = 0
    while True:
        try:
            c.sendall(b"%d\n" % i)
        except OSError as exc:
            print(f"closed {exc.errno}", flush=True)
            return
        print(i, flush=True)
        i += 1
        time.sleep(tick)


if __name__ == "__main__":
    main()
