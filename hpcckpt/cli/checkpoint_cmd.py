"""`hpcckpt checkpoint`: ask a running job's runner for a checkpoint now."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hpcckpt.cli.common import add_json_arg, formatter, print_json
from hpcckpt.errors import EngineError, HpcckptError
from hpcckpt.inputs import seconds_arg
from hpcckpt.jobid import validate_job_id

HELP = """\
Ask the runner of job JOBID (on this node, over its control socket) for a
checkpoint now, and print the new checkpoint id. With --and-stop, the job is
ended once its image is committed (for preemption or migration; if the
checkpoint fails the job goes on running).

It works for every engine: a CRIU job is dumped; a program run with
'--engine app' that uses hpcckpt.Checkpointer saves at its next due() (the
answer comes once its image is committed); with --app-files its restart
files are captured.

examples:
  hpcckpt checkpoint 4242
  hpcckpt checkpoint --and-stop 4242 && scontrol requeue 4242
  hpcckpt checkpoint --json mysim

exit codes: 0 done; 8 the checkpoint failed (the job runs on); 14 no runner
  for JOBID on this node; 7 store error; 6 catalog error.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint a running job now", description=HELP,
                       formatter_class=formatter())
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--and-stop", action="store_true", help="end the job after its checkpoint is committed")
    p.add_argument("--deadline", type=seconds_arg, metavar="S", help="give up (committing nothing) after S seconds")
    p.add_argument("--timeout", type=seconds_arg, default=900.0, metavar="S",
                   help="how long to wait for the runner's answer (default 900)")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpcckpt.core.runner.control import request

    validate_job_id(args.job_id)  # one no run could have been given: a usage error, not "no runner"
    doc: dict[str, Any] = {"op": "checkpoint", "stop": bool(args.and_stop)}
    if args.deadline is not None:
        doc["deadline"] = args.deadline
    ans = request(args.job_id, doc, timeout=args.timeout)
    if not ans.get("ok"):
        err: HpcckptError = EngineError(f"job {args.job_id}: {ans.get('error', 'checkpoint failed')}",
                                        log_excerpt=str(ans.get("excerpt", "")))
        err.exit_code = int(ans.get("exit_code", err.exit_code))
        if ans.get("excerpt"):
            sys.stderr.write(str(ans["excerpt"]) + "\n")
        raise err
    if args.json:
        print_json(ans)
    else:
        print(ans["ckptid"])
    return 0
