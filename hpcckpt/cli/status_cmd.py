"""`hpcckpt status`: which jobs are protected, where they run, and which need a look."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from hpcckpt.cli.common import add_json_arg, add_store_args, formatter, print_json
from hpcckpt.cli.metrics_cmd import _duration

HELP = """\
For each job: whether it is running and where, its last good checkpoint and
how long ago, its interval, and a warning when it has had no committed
checkpoint in two intervals (stale) or its last three checkpoints failed
(failing). Whether a job runs is asked of its runner on this node; a job
running elsewhere shows as '?'.

You see your own jobs; root sees every user's (or one with --user). Jobs
with no activity in --since (default 7d) are left out unless they run.

examples:
  hpcckpt status
  hpcckpt status --json | jq '.[] | select(.warnings != [])'
  sudo hpcckpt status --user alice
"""


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="checkpoint health of jobs, with warnings", description=HELP,
                       formatter_class=formatter())
    p.add_argument("job_id", nargs="?", metavar="JOBID", help="only this job")
    p.add_argument("--user", metavar="NAME", help="(root) only this user's jobs")
    p.add_argument("--since", type=_duration, default=7 * 86400, metavar="DURATION",
                   help="only jobs active within this long (default 7d)")
    add_store_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def _ago(seconds: float | None) -> str:
    from hpcckpt.observe.report import ago

    return "-" if seconds is None else ago(seconds)


def run(args: argparse.Namespace) -> int:
    from hpcckpt.context import current_user
    from hpcckpt.core.status import job_statuses
    from hpcckpt.observe.visible import visible_jobs
    from hpcckpt.store.site import Site

    site = Site.load(store=args.store, catalog=args.catalog, policy_file=args.policy)
    now = time.time()
    jobs = visible_jobs(site, current_user(), user_name=args.user, job_id=args.job_id)
    statuses = [s for s in job_statuses(jobs, now=now)
                if s.running or args.job_id is not None or any(
                    j.job_id == s.job_id and j.uid == s.uid and now - j.last_activity <= args.since for j in jobs)]
    if args.json:
        print_json([s.to_dict() for s in statuses])
        return 0
    if not statuses:
        sys.stderr.write("hpcckpt: no jobs" + (f" named {args.job_id}" if args.job_id else "") + "\n")
        return 0
    head = ["USER", "JOB", "RUNNING", "WHERE", "LAST GOOD", "WHEN", "INTERVAL", "OK", "FAILED"]
    table = [head]
    for s in statuses:
        table.append([
            s.user, s.job_id, {True: "yes", False: "no", None: "?"}[s.running], s.where or "-",
            str(s.last_good_ckptid) if s.last_good_ckptid is not None else "none", _ago(s.last_good_age_s),
            f"{s.interval_s:.0f}s {s.interval_origin}" if s.interval_s is not None else "-",
            str(s.committed), str(s.failed),
        ])
    table = [[c.replace("\n", "\\n") for c in row] for row in table]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for row in table:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    for s in statuses:
        for w in s.warnings:
            sys.stdout.write(f"warning: job {s.job_id} ({s.user}): {w}\n".replace("\r", ""))
    return 0
