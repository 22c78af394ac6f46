"""Appends LIMIT numbered lines to PATH, one per TICK, then ends with status 0.

With PORT (0: none) it first listens on 127.0.0.1:PORT (without
SO_REUSEADDR), so a restore fails for a reason a test can provoke: the port
taken by someone else. With LIB it maps that shared library (ctypes), so a
test can remove a library the job uses.
"""

from __future__ import annotations

import ctypes
import socket
import sys
import time


def main() -> None:
    path, limit, tick = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    port = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    lib = ctypes.CDLL(sys.argv[5]) if len(sys.argv) > 5 else None
    listener = None
    if port:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
    with open(path, "a", buffering=1) as out:
        for i in range(limit):
            out.write(f"{i}\n")
            time.sleep(tick)
    if listener is not None:
        listener.close()
    del lib


if __name__ == "__main__":
    main()
