"""`hpcckpt resume`: restore a job from its latest valid image and keep it checkpointed."""

from __future__ import annotations

import argparse
from typing import Any

from hpcckpt.cli.common import add_store_args, formatter
from hpcckpt.errors import UsageError

HELP = """\
Restore job JOBID from its latest committed image (or --ckpt ID), as a child
of this command, in a fresh PID namespace and with your credentials; go on
checkpointing it, wait for it, and exit with its exit status.

Before CRIU sees a byte, the whole image is verified, and this node is
checked: CPU features, architecture, and the files the job had open (a file
the job was writing that only grew is cut back to its checkpointed size; one
that shrank, was replaced, or a read-only input that changed is refused). If
the latest image is corrupt or CRIU cannot restore it, the one before it is
used, and a warning says so.

examples:
  hpcckpt resume 4242
  hpcckpt resume 4242 --ckpt 17
  hpcckpt resume mysim --interval 10m

exit codes: the job's own status (128+N if killed by signal N); 85
  checkpointed and stopped; 4 every image corrupt; 8 CRIU failed; 9 this node
  or the job's files do not match; 10 not your checkpoint; 11 no checkpoint.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("resume", help="restart a job from its latest checkpoint", description=HELP,
                       formatter_class=formatter())
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--ckpt", type=int, metavar="ID", help="this checkpoint, not the latest")
    p.add_argument("--interval", metavar="S", help="seconds between checkpoints after the restore")
    p.add_argument("--deadline", type=float, metavar="S", help="seconds a final checkpoint may take")
    p.add_argument("--submit", action="store_true", help="submit a new Slurm job that resumes JOBID")
    add_store_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.ckpt is not None and args.ckpt <= 0:
        raise UsageError(f"--ckpt must be a positive checkpoint id, got {args.ckpt}")
    if args.submit:
        raise UsageError("--submit is handled by the Slurm integration; use 'hpcckpt slurm' or see docs/slurm.md")
    from hpcckpt.runner.session import SessionOptions, resume_job

    opts = SessionOptions(store=args.store, catalog=args.catalog, policy=args.policy, interval=args.interval,
                          deadline=args.deadline)
    return resume_job(args.job_id, opts, ckptid=args.ckpt)
