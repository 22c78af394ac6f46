"""`hpcckpt drain NODE`: drain a node and move its hpcckpt jobs elsewhere, from a final checkpoint."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from hpcckpt.cli.common import add_json_arg, formatter, print_json
from hpcckpt.errors import UsageError
from hpcckpt.exitcodes import EXIT_OK, EXIT_SLURM

if TYPE_CHECKING:
    from hpcckpt.cluster.drain import MoveOptions

HELP = """\
Drain NODE in Slurm (no new job lands there), then move every job under
hpcckpt off it without lost work: each takes a final checkpoint at once, is
requeued with NODE excluded and resumes from that checkpoint on another node.
Jobs not under hpcckpt are left alone to finish, and listed.

A job is under hpcckpt when its batch script runs 'exec hpcckpt run' (the
template in plugins/slurm/sbatch-template.sh): its runner is then the batch
shell, which alone gets the signal (USR1) that asks for the final checkpoint.

For root and Slurm operators (SlurmUser, or AdminLevel Operator/Administrator
in sacctmgr). The command waits until each moved job runs again (--timeout),
then reports its downtime split into freeze, flush, Slurm scheduling and
restore (from the catalog).

An admin who drains with 'scontrol update nodename=N state=drain' or
'scontrol reboot ASAP N' gets the same from 'hpcckpt slurm drain-watch' run
periodically on the controller (docs/slurm.md).

examples:
  hpcckpt drain node17 --reason "DIMM errors"
  hpcckpt drain node17 --json | jq '.moved[] | {job_id, downtime}'
  hpcckpt drain node17 --no-wait          # return once the jobs are requeued

exit codes: 0 every hpcckpt job moved; 12 a job could not be moved (see the
  report) or Slurm failed; 10 not root or a Slurm operator; 11 no such node.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("drain", help="drain a node, moving its hpcckpt jobs elsewhere without lost work",
                       description=HELP, formatter_class=formatter())
    p.add_argument("node", metavar="NODE")
    p.add_argument("--reason", default="", metavar="TEXT", help="why (shown by 'sinfo -R')")
    add_move_args(p, "jobs are")
    p.set_defaults(func=run)


def add_move_args(p: Any, what: str) -> None:
    """The options drain and migrate share: how long to wait, whether to wait for the resume, --json."""
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for each final checkpoint and requeue, and again for the resume "
                        "(default 300)")
    p.add_argument("--no-wait", action="store_true", help=f"return once the {what} requeued")
    add_json_arg(p)


def move_options(args: argparse.Namespace) -> MoveOptions:
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    from hpcckpt.cluster.drain import MoveOptions

    return MoveOptions(stop_timeout=args.timeout, resume_timeout=0 if args.no_wait else args.timeout)


def run(args: argparse.Namespace) -> int:
    opts = move_options(args)
    from hpcckpt.cluster.drain import drain_node
    from hpcckpt.cluster.hooks import default_deps
    from hpcckpt.context import current_user

    report = drain_node(default_deps(), args.node, args.reason, current_user(), opts)
    if args.json:
        print_json(report.to_dict())
    else:
        print(render_report(report.to_dict()))
    return EXIT_OK if report.ok else EXIT_SLURM


def render_report(doc: dict[str, Any]) -> str:
    lines = [f"node {doc['node']}: " + (f"drained ({doc['reason']})" if doc["drained"] else
                                         f"drained by the admin ({doc['reason'] or 'no reason'})")]
    lines.append(f"moved: {len(doc['moved'])} job(s)" if doc["moved"] else "moved: no job under hpcckpt")
    for m in doc["moved"]:
        lines.append(f"  {m['job_id']:<12} {m['user']:<10} {m['state']:<9} {m['detail']}")
        dt = m["downtime"]
        if any(v is not None for v in dt.values()):
            lines.append("    downtime " + "  ".join(f"{k.removesuffix('_s')} {_sec(v)}" for k, v in dt.items()))
    if doc["left_alone"]:
        lines.append(f"left alone: {len(doc['left_alone'])} job(s)")
        for p in doc["left_alone"]:
            lines.append(f"  {p['job_id']:<12} {p['user']:<10} {p['why']}")
    return "\n".join(lines)


def _sec(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f}s"
