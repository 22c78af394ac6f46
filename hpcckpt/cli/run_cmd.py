"""`hpcckpt run`: start a job under checkpointing (or resume it after a requeue)."""

from __future__ import annotations

import argparse
from typing import Any

from hpcckpt.cli.common import add_store_args, formatter
from hpcckpt.errors import UsageError
from hpcckpt.inputs import seconds_arg

HELP = """\
Start COMMAND as pid 1 of a new PID namespace, checkpoint its whole process
tree with CRIU every interval while it runs, and exit with its exit status.
Its stdout and stderr are appended to hpcckpt's own (the job's output files).

In a Slurm job that was requeued (SLURM_RESTART_COUNT > 0) the job's latest
valid image is restored instead of starting COMMAND (unless its last run had
ended on its own with status 0: then COMMAND starts again). On SIGTERM or the
warning signal (policy preemption.signals, default TERM and USR1) a final
checkpoint is taken and hpcckpt exits 85 so that Slurm requeues the job
(RequeueExit=85 in slurm.conf).

Only one copy of a job id runs at a time (a lease in the catalog, renewed
while the job runs); the job is killed if hpcckpt itself dies. The options
given here are recorded for 'hpcckpt resume', which keeps them.

With --engine app the program is not frozen: it checkpoints itself. One that
uses the hpcckpt.Checkpointer API (docs/mpi.md) gets the job's context in its
environment, and is asked to save (and, on preemption, to save and stop)
at its next Checkpointer.due(); with --app-files the restart files it
writes are captured into images, and put back before it is run again. The
command, its directory and the environment it depends on (PATH,
PYTHONPATH, OMP_*, OMPI_*, ...: docs/mpi.md) are recorded, and 'hpcckpt
resume JOBID' runs it again. Either way --interval, SIGTERM (exit 85) and
'hpcckpt checkpoint JOBID' work as for CRIU jobs.

examples:
  hpcckpt run --interval 10m -- ./simulate input.nml
  hpcckpt run --job-id mysim --interval 30 -- python train.py
  hpcckpt run --job-id mysim --resume-if-possible -- python train.py   # goes on from mysim's image
  hpcckpt run --engine app --interval 1m -- mpirun -n 4 python3 prog.py  # prog uses hpcckpt.Checkpointer
  hpcckpt run --engine app --app-files 'restart.*' --app-signal USR1 -- ./fortran_code
  # in a batch script (exec, so that Slurm's signals reach hpcckpt):
  #   #SBATCH --requeue --signal=B:USR1@120
  #   exec hpcckpt run -- ./simulate

exit codes: the job's own status; 128+N if it was killed by signal N;
  85 checkpointed and stopped (requeue me); 2 usage; 3 policy; 8 CRIU could
  not start the job; 9/4 a resume was refused or its images were corrupt;
  15 this job id is already running (here or on another node).
"""


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run a job with periodic checkpoints", description=HELP,
                       formatter_class=formatter())
    p.add_argument("--interval", metavar="S", help="seconds between checkpoints (600, 10m, 1h, auto); "
                   "default: the policy's interval")
    p.add_argument("--job-id", metavar="ID", help="job id outside Slurm (default: the Slurm job id, or generated)")
    p.add_argument("--resume-if-possible", action="store_true",
                   help="if this job id already has a committed image, restore it instead of starting COMMAND")
    p.add_argument("--deadline", type=seconds_arg, metavar="S",
                   help="seconds a final checkpoint may take after SIGTERM (default: policy grace_time - margin)")
    p.add_argument("--signal", action="append", metavar="SIG", dest="signals", type=_signal,
                   help="preemption signal (repeatable; default: policy preemption.signals, TERM and USR1)")
    p.add_argument("--engine", choices=("criu", "app"), default=None,
                   help="criu: transparent (default); app: the program checkpoints itself, with the "
                   "hpcckpt.Checkpointer API, or (with --app-files) by writing restart files")
    p.add_argument("--app-files", action="append", metavar="GLOB", default=[],
                   help="with --engine app: files that make up the application's checkpoint (repeatable)")
    p.add_argument("--app-signal", metavar="SIG", help="with --engine app: signal that asks the app to save")
    add_store_args(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the job to run")
    p.set_defaults(func=run)


def _signal(text: str) -> str:
    """argparse ``type=`` for --signal: a signal a job can catch, checked as the policy checks its own."""
    from hpcckpt.policy.kinds import Invalid, SignalListKind

    try:
        return SignalListKind().parse([text], from_text=False)[0]
    except Invalid as exc:
        raise argparse.ArgumentTypeError(f"not a signal a job can catch: {text!r} ({exc})") from None


def run(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("no command given", hint="hpcckpt run [OPTIONS] -- COMMAND [ARGS...]")
    args.command = argv
    from hpcckpt.core.runner.session import SessionOptions, run_job

    opts = SessionOptions(store=args.store, catalog=args.catalog, policy=args.policy, interval=args.interval,
                          deadline=args.deadline, signals=args.signals)
    if args.engine == "app":
        import os

        from hpcckpt.app.engines import engine_factory, engine_record
        from hpcckpt.core.runner.relaunch import run_launched

        record = engine_record(argv, os.getcwd(), os.environ, app_files=args.app_files, app_signal=args.app_signal)
        return run_launched(argv, opts, engine_factory(record), record, job_id=args.job_id)
    if args.app_files or args.app_signal:
        raise UsageError("--app-files and --app-signal need --engine app")
    return run_job(argv, opts, job_id=args.job_id, resume_if_possible=args.resume_if_possible)
