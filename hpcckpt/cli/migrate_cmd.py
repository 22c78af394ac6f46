"""`hpcckpt migrate JOBID`: move one running job to another node from a final checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from hpcckpt.cli.common import formatter, print_json
from hpcckpt.cli.drain_cmd import add_move_args, move_options
from hpcckpt.exitcodes import EXIT_OK, EXIT_SLURM

HELP = """\
Move your running job JOBID off its node: it takes a final checkpoint now,
is requeued with its current node(s) excluded, and resumes from that
checkpoint on another node. Nothing is lost but the minutes it waits in the
queue.

The job must run 'exec hpcckpt run' in its batch script and be requeueable
(plugins/slurm/sbatch-template.sh). For the job's owner, root and Slurm
operators. Waits until the job runs again (--timeout), then prints where, and
its downtime split into freeze, flush, Slurm scheduling and restore.

examples:
  hpcckpt migrate 4242
  hpcckpt migrate 4242 --json | jq .downtime
  hpcckpt migrate 4242 --no-wait

exit codes: 0 moved; 12 it could not be (not under 'exec hpcckpt run', not
  running, Slurm refused); 10 not your job; 11 no such job.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("migrate", help="move a running job to another node from a final checkpoint",
                       description=HELP, formatter_class=formatter())
    p.add_argument("job_id", metavar="JOBID")
    add_move_args(p, "job is")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = move_options(args)
    from hpcckpt.cluster.drain import migrate_job
    from hpcckpt.cluster.hooks import default_deps
    from hpcckpt.context import current_user
    from hpcckpt.slurm.adapter import check_job_id

    check_job_id(args.job_id)
    result = migrate_job(default_deps(), args.job_id, current_user(), opts)
    doc = result.to_dict()
    if args.json:
        print_json(doc)
    else:
        where = ",".join(doc["new_nodes"]) or "?"
        print(f"job {doc['job_id']}: {doc['state']}: {doc['detail']} (from {','.join(doc['from_nodes'])}"
              + (f" to {where})" if doc["state"] == "resumed" else ")"))
        dt = doc["downtime"]
        if any(v is not None for v in dt.values()):
            print("downtime " + "  ".join(f"{k.removesuffix('_s')} {'?' if v is None else f'{v:.2f}s'}"
                                          for k, v in dt.items()))
    return EXIT_OK if result.state != "failed" else EXIT_SLURM
