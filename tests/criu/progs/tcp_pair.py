"""A server and its client in one job, on a fixed loopback port: the client sends 0, 1, 2, ... and the
server prints each number it receives. Two copies of it on one node clash unless each has its own network."""

from __future__ import annotations

import os
import socket
import sys
import time


def main() -> None:
    port, limit, tick = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen()
    if os.fork() == 0:
        srv.close()
        with socket.create_connection(("127.0.0.1", port)) as c:
            for i in range(limit):
                c.sendall(b"%d\n" % i)
                time.sleep(tick)
        os._exit(0)
    conn, _ = srv.accept()
    for line in conn.makefile():
        print(line.strip(), flush=True)
    os.wait()


if __name__ == "__main__":
    main()
