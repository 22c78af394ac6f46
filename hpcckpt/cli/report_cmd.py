"""`hpcckpt report`: one page on a job's checkpoints: plots (PNG or HTML) or a text summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hpcckpt.cli.common import add_json_arg, add_store_args, formatter, print_json

HELP = """\
One page on job JOBID's checkpoints: the freeze and flush time of each, each
image's size against the bytes actually written, the interval chosen
against the measured cost, and restarts and fallbacks on the timeline.

--output FILE.png writes the plots; --output FILE.html a page with the plots
and a table of every data series. Without --output: a text summary (--json:
the data series). Plots need matplotlib: pip install 'hpcckpt[report]'.

examples:
  hpcckpt report 4242
  hpcckpt report 4242 --output report.html
  hpcckpt report 4242 --output 4242.png
  hpcckpt report 4242 --json | jq '.attempts[] | .frozen_s'
"""


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="a page of plots on a job's checkpoints", description=HELP,
                       formatter_class=formatter())
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("-o", "--output", metavar="FILE", help="write FILE.png or FILE.html")
    p.add_argument("--user", metavar="NAME", help="(root) the job of this user")
    add_store_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpcckpt.context import current_user
    from hpcckpt.errors import NotFoundError, UsageError
    from hpcckpt.fs.safe import atomic_write_bytes
    from hpcckpt.observe import report
    from hpcckpt.observe.visible import visible_jobs
    from hpcckpt.store.site import Site

    out = Path(args.output) if args.output else None
    if out is not None and out.suffix.lower() not in (".png", ".html", ".htm"):
        raise UsageError(f"--output {out}: the name must end in .png or .html")
    acting = current_user()
    site = Site.load(store=args.store, catalog=args.catalog, policy_file=args.policy)
    jobs = visible_jobs(site, acting, user_name=args.user, job_id=args.job_id)
    if not jobs:
        raise NotFoundError(f"job {args.job_id} has no checkpoints", hint="see 'hpcckpt list'")
    if len(jobs) > 1:
        raise UsageError(f"job id {args.job_id} belongs to several users ({', '.join(j.user for j in jobs)})",
                         hint="pick one with --user")
    job = jobs[0]
    if args.json:
        print_json(report.series(job))
        return 0
    if out is None:
        sys.stdout.write("\n".join(report.summary_lines(job)) + "\n")
        return 0
    png = report.render_png(job)
    data = png if out.suffix.lower() == ".png" else report.render_html(job, png).encode()
    atomic_write_bytes(out.resolve(), data)  # 0600, as the checkpoints it describes
    sys.stderr.write(f"hpcckpt: wrote {out}\n")
    return 0
