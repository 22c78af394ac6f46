#!/usr/bin/env python3
"""A complete MPI program that checkpoints itself with hpcckpt (see docs/mpi.md).

It integrates the 1-D heat equation on a rod split across the ranks, with a
halo exchange every step, so the ranks really depend on each other. The
result is deterministic: the same steps give the same bits, whether the run
was interrupted or not.

    mpirun -n 4 python examples/mpi_integrate.py --steps 2000 --out result.json

Run it again after killing it (or under Slurm after a preemption) and it
continues from its latest checkpoint. ``--out`` receives the final field's
SHA-256 and sum; compare them with an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import numpy as np
from mpi4py import MPI

from hpcckpt import Checkpointer
from hpcckpt.errors import HpcckptError
from hpcckpt.exitcodes import EXIT_REQUEUE

ALPHA = 0.25  # diffusion number; below 0.5 the explicit scheme is stable


def initial_field(rank: int, cells: int) -> np.ndarray:
    """Each rank's slice of a deterministic, non-trivial starting temperature."""
    x = (np.arange(cells, dtype=np.float64) + rank * cells) * 0.01
    return np.sin(x) + 0.5 * np.cos(3.0 * x)


def step(comm: MPI.Comm, u: np.ndarray) -> np.ndarray:
    """One explicit Euler step, exchanging one halo cell with each neighbour."""
    rank, size = comm.Get_rank(), comm.Get_size()
    left = rank - 1 if rank > 0 else MPI.PROC_NULL
    right = rank + 1 if rank < size - 1 else MPI.PROC_NULL
    halo_l = np.zeros(1)
    halo_r = np.zeros(1)
    # Shift left, then right: each rank sends its edge cell and receives its
    # neighbour's; PROC_NULL at the ends turns those transfers into no-ops.
    comm.Sendrecv(u[:1], dest=left, recvbuf=halo_r, source=right)
    comm.Sendrecv(u[-1:], dest=right, recvbuf=halo_l, source=left)
    padded = np.concatenate([halo_l if left != MPI.PROC_NULL else u[:1], u,
                             halo_r if right != MPI.PROC_NULL else u[-1:]])
    return u + ALPHA * (padded[:-2] - 2.0 * u + padded[2:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--cells", type=int, default=10_000, help="cells per rank")
    p.add_argument("--save-every", type=int, default=0,
                   help="also checkpoint every N steps (the application's own schedule)")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to pause per step (for demos)")
    p.add_argument("--out", help="rank 0 writes the result here as JSON")
    args = p.parse_args()

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    with Checkpointer(comm=comm) as ck:
        state = ck.restore()
        if state is None:
            state = {"step": 0, "u": initial_field(rank, args.cells)}
        elif rank == 0:
            print(f"resumed at step {state['step']} from checkpoint {ck.last_ckptid}", flush=True)
        u, n = state["u"], state["step"]
        while n < args.steps:
            u = step(comm, u)
            n += 1
            if args.sleep:
                time.sleep(args.sleep)
            # due() is collective, so every rank calls it every step; the
            # application's own schedule is the same on every rank.
            due = ck.due()
            if due or (args.save_every > 0 and n % args.save_every == 0):
                ckptid = ck.save({"step": n, "u": u})
                if rank == 0:
                    print(f"checkpoint {ckptid} at step {n}", flush=True)
                if ck.stop_requested:
                    if rank == 0:
                        print(f"preempted: stopping at step {n}; rerun to continue", flush=True)
                    return EXIT_REQUEUE
        field = comm.gather(u, root=0)
    if rank == 0:
        assert field is not None  # gather returns the list on the root rank
        whole = np.concatenate(field)
        result = {"steps": n, "sha256": hashlib.sha256(whole.tobytes()).hexdigest(), "sum": float(whole.sum())}
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(result, f)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HpcckptError as err:
        # Every rank raises the same error (the protocol agrees on outcomes);
        # rank 0 reports it.
        if MPI.COMM_WORLD.Get_rank() == 0:
            sys.stderr.write(f"mpi_integrate: {err.render()}\n")
        sys.exit(err.exit_code)
