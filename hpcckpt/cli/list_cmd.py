"""`hpcckpt list`: the checkpoints in the catalog, as a table or JSON."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from hpcckpt.catalog import CkptRecord
from hpcckpt.cli.common import add_json_arg, add_store_args, print_json
from hpcckpt.context import current_user
from hpcckpt.humanize import human_size
from hpcckpt.store.access import has_catalog, target_users
from hpcckpt.store.site import Site

HELP = """\
List checkpoints, oldest first: their id, job, state (writing, committed,
failed, deleted, corrupt), size, when they were taken, on which node, and the
parent of an incremental one. A resume takes the newest committed image of a
job; an image that verify or a resume found damaged, or not the checkpoint
its row names, is 'corrupt' (-l shows why) and is never restored.

You see your own checkpoints; root sees every user's (or one with --user).

examples:
  hpcckpt list                 # all your checkpoints
  hpcckpt list 4242            # those of job 4242
  hpcckpt list --all 4242      # including deleted ones
  hpcckpt list --json 4242 | jq '.[] | select(.status == "committed") | .ckptid'
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "list", help="list checkpoints", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("job_id", nargs="?", metavar="JOBID", help="only this job (Slurm job id or local id)")
    p.add_argument("--all", action="store_true", help="include deleted checkpoints")
    p.add_argument("-l", "--long", action="store_true", help="also show path and error text")
    p.add_argument("--user", metavar="NAME", help="(root) only this user's checkpoints")
    add_store_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def collect(args: argparse.Namespace) -> list[CkptRecord]:
    site = Site.load(store=args.store, catalog=args.catalog, policy_file=args.policy)
    acting = current_user()
    if site.shared_catalog and acting.is_root and args.user is None:
        with site.opened(acting) as (cat, _):
            return cat.list(args.job_id, include_deleted=args.all)
    rows: list[CkptRecord] = []
    for user in target_users(site.store_root, acting, args.user):
        if not has_catalog(site, user):
            continue
        with site.opened(user) as (cat, _):
            rows.extend(cat.list(args.job_id, uid=user.uid, include_deleted=args.all))
    return sorted(rows, key=lambda r: r.ckptid)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def render_table(rows: list[CkptRecord], *, long: bool, show_user: bool) -> str:
    headers = ["CKPTID", *(["USER"] if show_user else []), "JOB", "STEP", "STATUS", "SIZE", "CREATED",
               "TOOK", "NODE", "PARENT", *(["PATH", "ERROR"] if long else [])]
    table = [headers]
    for r in rows:
        table.append([
            str(r.ckptid), *([r.user] if show_user else []), r.job_id, r.step or "-", r.status.value,
            human_size(r.size_bytes) if r.size_bytes else "-", _when(r.created),
            f"{r.duration:.1f}s" if r.duration is not None else "-", r.node or "-",
            str(r.parent) if r.parent is not None else "-",
            *([r.path or "-", r.error.splitlines()[0] if r.error else ""] if long else []),
        ])
    # Job ids and paths may hold anything: keep each cell on one line.
    table = [[c.replace("\n", "\\n") for c in row] for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    right = {"CKPTID", "SIZE", "PARENT", "TOOK"}
    lines = []
    for row in table:
        cells = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(row, widths, headers, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    rows = collect(args)
    if args.json:
        print_json([r.to_dict() for r in rows])
        return 0
    if not rows:
        sys.stderr.write("hpcckpt: no checkpoints" + (f" for job {args.job_id}" if args.job_id else "") + "\n")
        return 0
    show_user = len({r.uid for r in rows}) > 1
    sys.stdout.write(render_table(rows, long=args.long, show_user=show_user))
    return 0
