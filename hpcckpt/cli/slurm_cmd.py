"""`hpcckpt slurm`: the Slurm hooks' entry points, and what Slurm tells this job."""

from __future__ import annotations

import argparse
from typing import Any

from hpcckpt.cli.common import add_json_arg, formatter, print_json

DESCRIPTION = """\
Entry points for Slurm's hooks. slurm.conf runs the scripts in plugins/slurm/,
which call these as root; see docs/slurm.md.

  prolog        on each node before the job: create its store and staging dirs
                (owned by the job's user), save its sbatch settings for
                'hpcckpt resume --submit', check the node can checkpoint and
                drain it if not (only with policy slurm.drain_on_failed_check)
  epilog        on each node after the job: commit an image its runner had fully
                written, abort a partial one, clean staging, log the end
  ctld-epilog   on the controller after the job: requeue it or adjust Slurm's
                requeue (backoff, ExcNodeList) by policy failure.*
  drain-watch   on the controller, periodically: move the hpcckpt jobs off
                nodes an admin drained with scontrol (state=drain, reboot ASAP),
                as 'hpcckpt drain' does; Slurm has no hook for that moment
  env           print what Slurm tells this job (SLURM_* variables, parsed)

The hooks always exit 0: a failing hook would make Slurm drain the node.

examples:
  # slurm.conf
  Prolog=/usr/share/hpcckpt/slurm/prolog
  # by hand, to see what a hook would do for job 4242 on node1
  SLURM_JOB_ID=4242 SLURM_JOB_UID=1000 SLURMD_NODENAME=node1 hpcckpt slurm epilog
  hpcckpt slurm env --json
"""


def register(sub: Any) -> None:
    p = sub.add_parser("slurm", help="Slurm hook entry points (Prolog, Epilog, EpilogSlurmctld)",
                       description=DESCRIPTION, formatter_class=formatter())
    hooks = p.add_subparsers(dest="hook", metavar="HOOK", required=True)
    for name, helptext, example in (
        ("prolog", "node Prolog: prepare dirs, save job settings, check the node",
         "SLURM_JOB_ID=4242 SLURM_JOB_UID=1000 SLURMD_NODENAME=node1 hpcckpt slurm prolog"),
        ("epilog", "node Epilog: salvage or abort a publish in flight, clean staging",
         "SLURM_JOB_ID=4242 SLURM_JOB_UID=1000 SLURMD_NODENAME=node1 hpcckpt slurm epilog"),
        ("ctld-epilog", "EpilogSlurmctld: restart decision by policy",
         "SLURM_JOB_ID=4242 SLURM_JOB_UID=1000 SLURM_JOB_EXIT_CODE2=0:15 hpcckpt slurm ctld-epilog"),
    ):
        h = hooks.add_parser(name, help=helptext, description=helptext + ". Reads the SLURM_* environment.",
                             epilog=f"example (as root, by hand):\n  {example}", formatter_class=formatter())
        h.set_defaults(func=run_hook)
    w = hooks.add_parser(
        "drain-watch", help="move hpcckpt jobs off nodes an admin is draining (run it periodically)",
        description="One pass: for each node drained by scontrol (state=drain, state=fail, reboot ASAP) that "
        "still runs jobs, move its jobs under hpcckpt elsewhere from a final checkpoint, as 'hpcckpt drain' "
        "does. Nodes drained by 'hpcckpt drain' are left to it. Root or a Slurm operator; run it on the "
        "controller every minute (docs/slurm.md).",
        epilog="examples:\n  hpcckpt slurm drain-watch\n  hpcckpt slurm drain-watch node17 --json\n"
        "  # cron, on the controller\n  * * * * * root flock -n /run/hpcckpt-drain-watch.lock "
        "hpcckpt slurm drain-watch", formatter_class=formatter())
    w.add_argument("nodes", nargs="*", metavar="NODE", help="only these nodes (default: all)")
    w.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for each final checkpoint and requeue (default 300)")
    add_json_arg(w)
    w.set_defaults(func=run_drain_watch)
    e = hooks.add_parser("env", help="print the parsed SLURM_* environment",
                         description="Print what Slurm tells this job, parsed (SLURM_JOB_ID must be set).",
                         epilog="examples:\n  hpcckpt slurm env\n  srun hpcckpt slurm env --json",
                         formatter_class=formatter())
    add_json_arg(e)
    e.set_defaults(func=run_env)


def run_hook(args: argparse.Namespace) -> int:
    from hpcckpt.cluster import hooks
    from hpcckpt.slurm.env import from_environ

    env = from_environ()
    fn = {"prolog": hooks.prolog, "epilog": hooks.epilog, "ctld-epilog": hooks.ctld_epilog}[args.hook]
    return fn(env)


def run_drain_watch(args: argparse.Namespace) -> int:
    from hpcckpt.cli.drain_cmd import render_report
    from hpcckpt.cluster.drain import MoveOptions, watch_once
    from hpcckpt.cluster.hooks import default_deps
    from hpcckpt.context import current_user
    from hpcckpt.exitcodes import EXIT_SLURM

    reports = watch_once(default_deps(), current_user(), args.nodes,
                         MoveOptions(stop_timeout=args.timeout, resume_timeout=0))
    if args.json:
        print_json([r.to_dict() for r in reports])
    else:
        for r in reports:
            print(render_report(r.to_dict()))
    return 0 if all(r.ok for r in reports) else EXIT_SLURM


def run_env(args: argparse.Namespace) -> int:
    from hpcckpt.slurm.env import from_environ

    env = from_environ()
    if args.json:
        print_json(env.to_dict())
    else:
        for key, value in env.to_dict().items():
            if key != "recorded" and value not in (None, ""):
                print(f"{key}: {value}")
    return 0
