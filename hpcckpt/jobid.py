"""Which job this is: the identity checkpoints are filed under.

Inside Slurm it is the job id, or ``ARRAYJOB_TASK`` for an array task (the
array's task ids share nothing but their array id, and each must resume its
own image). Outside Slurm it is ``--job-id``, or a generated id that is
printed so the user can resume it later.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from hpcckpt.errors import UsageError

_MAX_LEN = 200


@dataclass(frozen=True)
class JobIdentity:
    job_id: str
    source: str  # "slurm", "slurm-array", "cli", "generated"
    restart_count: int = 0  # SLURM_RESTART_COUNT: > 0 after a requeue
    array_job_id: str | None = None
    array_task_id: str | None = None
    step: str | None = None

    @property
    def requeued(self) -> bool:
        return self.restart_count > 0


def validate_job_id(job_id: str) -> str:
    if not job_id or len(job_id) > _MAX_LEN or any(c in job_id for c in "\x00\n/"):
        raise UsageError(f"invalid job id {job_id!r}",
                         hint="use letters, digits, '.', '_', '-' or '+', at most 200 characters")
    return job_id


def generate_job_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"local-{stamp}-{secrets.token_hex(3)}"


def resolve(cli_job_id: str | None = None, environ: Mapping[str, str] | None = None) -> JobIdentity:
    """``--job-id`` wins (a user may name a job explicitly), then Slurm, then a generated id."""
    env = os.environ if environ is None else environ
    try:
        restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        restarts = 0
    step = env.get("SLURM_STEP_ID") or None
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if cli_job_id:
        return JobIdentity(validate_job_id(cli_job_id), "cli", restarts, array_job, array_task, step)
    if array_job and array_task:
        return JobIdentity(f"{array_job}_{array_task}", "slurm-array", restarts, array_job, array_task, step)
    slurm_job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if slurm_job:
        return JobIdentity(validate_job_id(slurm_job), "slurm", restarts, None, None, step)
    return JobIdentity(generate_job_id(), "generated")
