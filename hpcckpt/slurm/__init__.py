"""Slurm integration: hooks (Prolog, Epilog, EpilogSlurmctld), restart policy and resubmission.

hpcckpt stays outside the scheduler: it reads Slurm's environment, calls
``scontrol``/``sbatch`` through :mod:`hpcckpt.slurm.adapter`, and relies on
``RequeueExit=85`` so a checkpointed runner is requeued by Slurm itself.
"""

from __future__ import annotations

from hpcckpt.slurm.adapter import ScontrolAdapter, SlurmAdapter, parse_show_job
from hpcckpt.slurm.env import SlurmEnv

__all__ = ["ScontrolAdapter", "SlurmAdapter", "SlurmEnv", "parse_show_job"]
