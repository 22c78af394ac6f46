"""mpi4py corpus program: the same integer work as mpi_steps.c, in Python ranks.

usage: python mpi4py_steps.py OUTDIR STEPS DELAY_MS
Rank 0 appends "step I SUM" to OUTDIR/trace.txt and prints "step I" after every step; result.txt at the end.
"""

import sys
import time

from mpi4py import MPI

MASK = (1 << 64) - 1
N = 512


def main() -> None:
    outdir, steps, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) / 1000
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    s = [((j + 1) * 0x9E3779B97F4A7C15 + rank) & MASK for j in range(N)]
    trace = open(f"{outdir}/trace.txt", "w") if rank == 0 else None  # noqa: SIM115 - rank 0 only, closed below
    right, left = (rank + 1) % size, (rank - 1) % size
    for i in range(steps):
        local = 0
        for j in range(N):
            s[j] = (s[j] * 6364136223846793005 + (j ^ i) + 1442695040888963407) & MASK
            local += s[j] >> 7
        local &= MASK
        from_left = comm.sendrecv(local, dest=right, source=left)
        s[i % N] ^= from_left
        total = comm.allreduce(local) & MASK
        if trace is not None:
            trace.write(f"step {i} {total}\n")
            trace.flush()
            print(f"step {i}", flush=True)
        if delay:
            time.sleep(delay)
    digest = 1469598103934665603
    for v in s:
        digest = ((digest ^ v) * 1099511628211) & MASK
    digests = comm.gather(digest, root=0)
    if trace is not None and digests is not None:
        trace.close()
        with open(f"{outdir}/result.txt", "w") as res:
            res.write(f"ranks {size} steps {steps}\n")
            for r, d in enumerate(digests):
                res.write(f"rank {r} {d:016x}\n")


if __name__ == "__main__":
    main()
