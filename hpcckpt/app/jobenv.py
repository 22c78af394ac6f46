"""Where an application-assisted checkpoint belongs: job id, store, catalog, interval.

``hpcckpt run`` exports the job's context to the program it starts; a
program started directly by ``sbatch``/``srun``/``mpirun`` gets what Slurm
sets. Precedence, for each item: the Checkpointer's keyword argument, then
``HPCCKPT_*``, then ``SLURM_*``, then the policy, then a documented default.

============================  ==================================================
``HPCCKPT_JOB_ID``            job id (else ``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID``
                              for array tasks, ``SLURM_JOB_ID``, and outside any
                              job ``local-<program name>``)
``HPCCKPT_STORE``             store root (else policy ``storage.root``, else
                              ``~/.local/share/hpcckpt/store``)
``HPCCKPT_CATALOG``           catalog URL (else policy ``storage.catalog``, else
                              ``STORE/USER/catalog.sqlite``)
``HPCCKPT_CKPT_INTERVAL``     seconds between checkpoints (``600``, ``10m``, ``auto``);
                              else policy ``interval``
``HPCCKPT_POLICY``            the user's policy file (read by load_policy)
``SLURM_RESTART_COUNT``       how often Slurm requeued the job
============================  ==================================================
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hpcckpt.context import node_name
from hpcckpt.errors import PolicyError
from hpcckpt.policy import Policy
from hpcckpt.policy.units import parse_duration
from hpcckpt.store.site import Site

# Slurm variables worth keeping in the image header: enough to tell later
# which allocation and geometry a checkpoint came from.
_SLURM_KEYS = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_PARTITION",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NTASKS",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_CLUSTER_NAME",
)


@dataclass(frozen=True)
class JobContext:
    job_id: str
    store_root: Path
    catalog_url: str | None
    interval: int | str  # seconds, or "auto"
    node: str
    step: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    requeue_count: int = 0
    slurm: dict[str, str] = field(default_factory=dict)
    cmdline: list[str] = field(default_factory=list)
    cwd: str = ""


def job_id_from_env(env: Mapping[str, str], argv0: str) -> str:
    if env.get("HPCCKPT_JOB_ID"):
        return env["HPCCKPT_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"]
    # Outside any job: a stable id per program, so re-running the same
    # program against the same store resumes it.
    name = Path(argv0).name or "python"
    return f"local-{Path(name).stem or name}"


def parse_interval(text: str, source: str) -> int | str:
    """Seconds from ``600``/``10m``/``1h30m``, or "auto"; PolicyError naming ``source`` otherwise."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise PolicyError(
            f"{source}: {text!r} is not an interval",
            hint="use seconds (600), a duration (10m, 1h30m) or 'auto'",
        ) from None
    if seconds <= 0:
        raise PolicyError(f"{source}: interval must be positive, got {text!r}")
    return seconds


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env.get(key, "0") or 0)
    except ValueError:
        return 0


def job_context(
    policy: Policy,
    *,
    env: Mapping[str, str] | None = None,
    job_id: str | None = None,
    store: str | Path | None = None,
    catalog: str | None = None,
    interval: int | str | None = None,
) -> JobContext:
    """Resolve the context as described in the module docstring."""
    env = os.environ if env is None else env
    argv = list(sys.argv)
    if interval is None:
        raw = env.get("HPCCKPT_CKPT_INTERVAL")
        interval = parse_interval(raw, "HPCCKPT_CKPT_INTERVAL") if raw else policy.interval
    elif isinstance(interval, str):
        interval = parse_interval(interval, "Checkpointer(interval=...)")
    elif interval <= 0:
        raise PolicyError(f"Checkpointer(interval=...): must be positive, got {interval}")
    # The Site reads HPCCKPT_STORE / HPCCKPT_CATALOG from os.environ; pass an
    # explicit env's values as the first choice so tests can inject one.
    site = Site.from_policy(policy, store=str(store) if store is not None else env.get("HPCCKPT_STORE"),
                            catalog=catalog or env.get("HPCCKPT_CATALOG"))
    store_root, catalog_url = site.store_root, site.catalog_url
    return JobContext(
        job_id=job_id or job_id_from_env(env, argv[0] if argv else ""),
        store_root=store_root,
        catalog_url=catalog_url,
        interval=interval,
        node=env.get("SLURMD_NODENAME") or node_name(),
        step=env.get("SLURM_STEP_ID") or None,
        array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
        array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
        requeue_count=_int_env(env, "SLURM_RESTART_COUNT"),
        slurm={k: env[k] for k in _SLURM_KEYS if k in env},
        cmdline=argv,
        cwd=os.getcwd(),
    )
