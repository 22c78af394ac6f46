"""How many threads may compress: the cores this process may use that nobody is using.

A background flush runs while the job computes; stealing its cores would slow
the job more than the flush saves. So the count comes from the CPUs this
process may run on (its Slurm cpuset) minus the current load, never more
than ``cap``, and 1 when the codec does no work.
"""

from __future__ import annotations

import os


def compression_workers(codec: str, *, cap: int = 4, job_frozen: bool = False) -> int:
    """Threads for pack_dir's ``workers``: 1 unless cores are idle (or the job is frozen)."""
    if codec == "none":
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if job_frozen:
        return max(1, min(cap, cpus))
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1
    return max(1, min(cap, int(cpus - load)))
