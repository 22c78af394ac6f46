"""`hpcckpt resume`: restore a job from its latest valid image and keep it checkpointed."""

from __future__ import annotations

import argparse
from typing import Any

from hpcckpt.cli.common import add_store_args, formatter
from hpcckpt.errors import UsageError
from hpcckpt.inputs import ckptid_arg, seconds_arg
from hpcckpt.jobid import validate_job_id

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

An incremental image is restored with its whole chain (each parent found
through the catalog and checked chunk by chunk); it is unpacked into tmpfs
when the node has the memory for it. The first checkpoint after the resume
is incremental on the image restored from.

With --submit nothing is restored here: a new Slurm job is submitted with
JOBID's batch script and resources, which resumes JOBID's latest image when
it starts; its job id is printed.

Only one copy of a job runs at a time: a job whose runner is alive (here, or
on another node) is refused with exit 15, naming where it runs; a runner that
died (its pid gone, its Slurm job ended, or its lease expired) is taken over.
A job whose last run ended on its own is refused with exit 16 unless --force.

A job run with --engine app is not restored by CRIU: its recorded command is
run again in its recorded directory and environment, under the same runner
(with its restart files put back for --app-files; a program using the
hpcckpt.Checkpointer API finds its latest checkpoint in restore()). An
image CRIU did not write is never handed to CRIU.
The options the job last ran with (--interval, --deadline, --signal, --policy)
apply again unless given here.

Root resumes another user's job only with --as-owner USER: hpcckpt then
becomes USER for good before it opens anything, and resumes exactly as USER
would, so CRIU never runs with root's power. Every uid and gid recorded in
the CRIU images must be USER's own (an image that claims uid 0 is refused,
unless it is of a job that ran in USER's own user namespace, where 0 is USER).

examples:
  hpcckpt resume 4242
  hpcckpt resume 4242 --ckpt 17
  hpcckpt resume mysim --interval 10m
  hpcckpt resume mysim --force                         # its last run had ended; run it again anyway
  hpcckpt resume 4242 --submit                         # prints the new job id
  hpcckpt resume 4242 --submit --sbatch=--partition=long --sbatch=--time=2:00:00
  sudo hpcckpt resume 4242 --as-owner alice            # an admin, on alice's behalf

exit codes: the job's own status (128+N if killed by signal N); 85
  checkpointed and stopped; 4 every image corrupt; 8 CRIU failed; 9 this node
  or the job's files do not match; 10 not your checkpoint; 11 no checkpoint;
  15 the job is already running; 16 the job already ended (use --force).
"""


def register(sub: Any) -> None:
    p = sub.add_parser("resume", help="restart a job from its latest checkpoint", description=HELP,
                       formatter_class=formatter())
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--ckpt", type=ckptid_arg, metavar="ID", help="this checkpoint, not the latest")
    p.add_argument("--interval", metavar="S", help="seconds between checkpoints after the restore")
    p.add_argument("--deadline", type=seconds_arg, metavar="S", help="seconds a final checkpoint may take")
    p.add_argument("--submit", action="store_true",
                   help="submit a new Slurm job that resumes JOBID, print its job id, and return")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPT",
                   help="with --submit: an extra sbatch option (repeatable; write --sbatch=--time=1:00:00)")
    p.add_argument("--force", action="store_true",
                   help="resume even though the job's last run ended on its own (exit status recorded)")
    p.add_argument("--as-owner", metavar="USER",
                   help="root only: become USER, then resume USER's job exactly as USER would")
    add_store_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    validate_job_id(args.job_id)  # one no run could have been given: a usage error, not "no runner"
    if args.sbatch and not args.submit:
        raise UsageError("--sbatch needs --submit")
    from hpcckpt.core.runner.session import SessionOptions, resume_job

    opts = SessionOptions(store=args.store, catalog=args.catalog, policy=args.policy, interval=args.interval,
                          deadline=args.deadline)
    if args.submit:
        if args.ckpt is not None or args.as_owner:
            raise UsageError("--submit resumes the latest checkpoint as yourself; drop --ckpt and --as-owner")
        from hpcckpt.cluster.submit import resubmit

        print(resubmit(args.job_id, store=opts.store, catalog=opts.catalog, policy=opts.policy,
                       extra_options=list(args.sbatch)))
        return 0
    if args.as_owner:
        from hpcckpt.context import user_by_name
        from hpcckpt.core.security import become

        try:
            as_owner = user_by_name(args.as_owner)
        except KeyError as err:
            raise UsageError(f"--as-owner: no user named {args.as_owner!r}") from err
        become(as_owner)  # before anything is opened (the job's lease, to tell its engine), for good
    from hpcckpt.core.runner.relaunch import recorded_launch, resume_launched

    record = recorded_launch(opts, args.job_id)
    if record is not None:  # a files/api job: its recorded command is run again
        from hpcckpt.app.engines import engine_factory

        if args.ckpt is not None:
            raise UsageError(f"job {args.job_id} checkpoints itself ({record['engine']} engine): it is resumed "
                             "from its latest checkpoint, --ckpt cannot choose one")
        return resume_launched(args.job_id, opts, engine_factory(record), record, force=args.force)
    return resume_job(args.job_id, opts, ckptid=args.ckpt, force=args.force)
