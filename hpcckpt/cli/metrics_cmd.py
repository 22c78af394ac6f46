"""`hpcckpt metrics`: checkpoint metrics in OpenMetrics text, on stdout or into a node_exporter textfile."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from hpcckpt.cli.common import add_store_args, formatter
from hpcckpt.policy.units import parse_duration

HELP = """\
Print checkpoint metrics in OpenMetrics text (which node_exporter's textfile
collector also reads), computed from the catalog: per job, the last good
checkpoint, checkpoints committed and failed, freeze/flush/total time
histograms, bytes written and saved by deduplication, restores, fallbacks
and the interval in force; per job on this node, staging in use and the
flush queue. Metric names and alerts: docs/monitoring.md.

You see your own jobs; root sees every user's (or one with --user). Jobs
with no activity in --since (default 1d) are left out, to keep series few.

examples:
  hpcckpt metrics
  hpcckpt metrics --job 4242
  hpcckpt metrics --textfile /var/lib/prometheus/node-exporter/hpcckpt.prom   # as root, from cron
"""


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 30m, 6h, 1d)") from None


def register(sub: Any) -> None:
    p = sub.add_parser("metrics", help="checkpoint metrics for Prometheus", description=HELP,
                       formatter_class=formatter())
    p.add_argument("--job", metavar="JOBID", help="only this job")
    p.add_argument("--user", metavar="NAME", help="(root) only this user's jobs")
    p.add_argument("--since", type=_duration, default=86400, metavar="DURATION",
                   help="only jobs active within this long (default 1d)")
    p.add_argument("--textfile", metavar="FILE",
                   help="write FILE atomically (0644, for node_exporter) instead of printing")
    add_store_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpcckpt.context import current_user
    from hpcckpt.fs.safe import safe_job_component
    from hpcckpt.observe.metrics import default_staging_bases, render, scan_staging, write_textfile
    from hpcckpt.observe.visible import visible_jobs
    from hpcckpt.policy import load_policy
    from hpcckpt.store.site import Site

    site = Site.load(store=args.store, catalog=args.catalog, policy_file=args.policy)
    acting = current_user()
    jobs = visible_jobs(site, acting, user_name=args.user, job_id=args.job, since=time.time() - args.since)
    pol = load_policy(user_file=Path(args.policy) if args.policy else None)
    disk = os.environ.get("HPCCKPT_STAGING") or pol.storage.staging
    users = None if acting.is_root and args.user is None else {args.user or acting.name}
    staged = scan_staging(default_staging_bases(Path(disk) if disk else None), users)
    if args.job is not None:
        staged = {k: v for k, v in staged.items() if k[1] == safe_job_component(args.job)}
    text = render(jobs, staged)
    if args.textfile:
        write_textfile(Path(args.textfile), text, acting)
    else:
        sys.stdout.write(text)
    return 0
