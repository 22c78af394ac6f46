"""A process tree holding a local TCP server and its client.

usage: python tcp_pair.py OUTDIR STEPS DELAY_MS
The parent forks a server (listening on an ephemeral loopback port, told to the parent through a pipe) and a
client that connects to it. Each step the client sends the step's request over the connection, the server
answers, and the client appends "step I ANSWER" to OUTDIR/trace.txt and prints "step I". The parent waits for
both and writes OUTDIR/result.txt from what the client and server report through pipes.
"""

import os
import socket
import sys
import time

MASK = (1 << 64) - 1


def serve(listener: socket.socket, report: int) -> None:
    conn, _ = listener.accept()
    state, served = 7, 0
    with conn, conn.makefile("rw") as f:
        for line in f:
            i, x = (int(v) for v in line.split())
            for _ in range(100):
                state = (state * 6364136223846793005 + x + i) & MASK
            served += 1
            f.write(f"{state}\n")
            f.flush()
    os.write(report, f"server served {served} state {state}\n".encode())


def client(port: int, outdir: str, steps: int, delay: float, report: int) -> None:
    x = 1
    with socket.create_connection(("127.0.0.1", port)) as conn, conn.makefile("rw") as f, \
            open(f"{outdir}/trace.txt", "w") as trace:
        for i in range(steps):
            f.write(f"{i} {x}\n")
            f.flush()
            x = int(f.readline()) % 1000000007
            trace.write(f"step {i} {x}\n")
            trace.flush()
            print(f"step {i}", flush=True)
            if delay:
                time.sleep(delay)
    os.write(report, f"client last {x}\n".encode())


def main() -> None:
    outdir, steps, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) / 1000
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    r, w = os.pipe()
    server_pid = os.fork()
    if server_pid == 0:
        os.close(r)
        serve(listener, w)
        os._exit(0)
    listener.close()
    client_pid = os.fork()
    if client_pid == 0:
        os.close(r)
        client(port, outdir, steps, delay, w)
        os._exit(0)
    os.close(w)
    reports = []
    with os.fdopen(r) as pipe:
        reports = sorted(pipe.read().splitlines())
    for pid in (server_pid, client_pid):
        _, status = os.waitpid(pid, 0)
        if status != 0:
            sys.exit(f"child {pid} ended with status {status}")
    with open(f"{outdir}/result.txt", "w") as res:
        res.write(f"steps {steps}\n" + "".join(f"{line}\n" for line in reports))


if __name__ == "__main__":
    main()
