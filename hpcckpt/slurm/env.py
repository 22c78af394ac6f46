"""What Slurm tells a job or a hook about itself, through ``SLURM_*`` variables.

One parser for the batch job (the runner), the node hooks (Prolog/Epilog,
which get a fresh environment from slurmd) and the controller's
EpilogSlurmctld, so every caller agrees on names and defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hpcckpt.errors import SlurmError

# Which SLURM_* variables go into the image header (ImageMeta.slurm): enough to
# tell where and how the job ran, nothing that may hold secrets.
RECORDED_VARS = (
    "SLURM_CLUSTER_NAME",
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_PARTITION",
    "SLURM_JOB_ACCOUNT",
    "SLURM_JOB_QOS",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NTASKS",
    "SLURM_CPUS_PER_TASK",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_SUBMIT_DIR",
    "SLURMD_NODENAME",
)


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SlurmError(
            f"${name}={raw!r} is not an integer",
            hint="this variable is set by Slurm; check the job's environment is not overridden",
        ) from exc


def _opt(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name, "").strip()
    return raw or None


@dataclass(frozen=True)
class SlurmEnv:
    """The job as Slurm describes it. ``job_id`` is the unique id of this job or array task."""

    job_id: str
    context: str = ""  # SLURM_SCRIPT_CONTEXT: prolog_slurmd, epilog_slurmd, epilog_slurmctld; "" in a job
    node: str = ""  # SLURMD_NODENAME; "" on the controller
    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    restart_count: int = 0
    step_id: str | None = None
    job_name: str | None = None
    partition: str | None = None
    nodelist: str | None = None
    exit_code: int | None = None  # EpilogSlurmctld only: the job's exit status (SLURM_JOB_EXIT_CODE2's left half)
    exit_signal: int | None = None  # EpilogSlurmctld only: the signal that ended it, if any
    derived_ec: int | None = None
    recorded: dict[str, str] = field(default_factory=dict)

    @property
    def in_array(self) -> bool:
        return self.array_job_id is not None and self.array_task_id is not None

    @property
    def display_id(self) -> str:
        """``4242_7`` for an array task (what users see in squeue), else the job id."""
        if self.in_array:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _exit_pair(raw: str | None) -> tuple[int | None, int | None]:
    """Parse ``SLURM_JOB_EXIT_CODE2`` ("status:signal")."""
    if not raw or ":" not in raw:
        return None, None
    left, _, right = raw.partition(":")
    try:
        return int(left), int(right)
    except ValueError:
        return None, None


def from_environ(environ: Mapping[str, str] | None = None) -> SlurmEnv:
    """Parse the ``SLURM_*`` environment; raises SlurmError when no job id is set."""
    env = os.environ if environ is None else environ
    job_id = _opt(env, "SLURM_JOB_ID") or _opt(env, "SLURM_JOBID")
    if job_id is None:
        raise SlurmError(
            "not inside a Slurm job: $SLURM_JOB_ID is not set",
            hint="run this from a batch script or a Slurm hook, or pass the job id explicitly",
        )
    exit_code, exit_signal = _exit_pair(_opt(env, "SLURM_JOB_EXIT_CODE2"))
    if exit_code is None:
        # SLURM_JOB_EXIT_CODE is the raw wait status.
        raw = _int(env, "SLURM_JOB_EXIT_CODE")
        if raw is not None:
            exit_code, exit_signal = (raw >> 8) & 0xFF, raw & 0x7F
    restarts = _int(env, "SLURM_RESTART_COUNT")
    if restarts is None:
        restarts = _int(env, "SLURM_JOB_RESTART_COUNT", 0)
    return SlurmEnv(
        job_id=job_id,
        context=env.get("SLURM_SCRIPT_CONTEXT", ""),
        node=env.get("SLURMD_NODENAME", ""),
        uid=_int(env, "SLURM_JOB_UID"),
        gid=_int(env, "SLURM_JOB_GID"),
        user=_opt(env, "SLURM_JOB_USER"),
        array_job_id=_opt(env, "SLURM_ARRAY_JOB_ID"),
        array_task_id=_opt(env, "SLURM_ARRAY_TASK_ID"),
        restart_count=restarts or 0,
        step_id=_opt(env, "SLURM_STEP_ID") or _opt(env, "SLURM_STEPID"),
        job_name=_opt(env, "SLURM_JOB_NAME"),
        partition=_opt(env, "SLURM_JOB_PARTITION"),
        nodelist=_opt(env, "SLURM_JOB_NODELIST") or _opt(env, "SLURM_NODELIST"),
        exit_code=exit_code,
        exit_signal=exit_signal,
        derived_ec=_int(env, "SLURM_JOB_DERIVED_EC"),
        recorded={k: env[k] for k in RECORDED_VARS if k in env},
    )


def in_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))
