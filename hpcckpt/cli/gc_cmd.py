"""`hpcckpt gc`: remove leftovers of dead writers and apply the retention policy."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hpcckpt.cli.common import add_json_arg, add_store_args, print_json
from hpcckpt.context import current_user
from hpcckpt.errors import UsageError
from hpcckpt.exitcodes import EXIT_OK, EXIT_STORE
from hpcckpt.humanize import human_size
from hpcckpt.policy.units import parse_duration
from hpcckpt.store.access import has_catalog, target_users
from hpcckpt.store.gc import DEFAULT_GRACE_S, DEFAULT_STALE_AFTER_S, GcReport, collect_garbage
from hpcckpt.store.site import Site

HELP = """\
Clean the store and apply the retention policy (retention.* in the policy):

  - temp files (.tmp-*) of writers that are gone;
  - checkpoints stuck in 'writing' whose writer died: marked failed, files removed;
  - files of failed and deleted checkpoints;
  - committed images beyond keep_last / keep_every / max_age / max_bytes.

A job's newest valid image, and any image a kept incremental one depends on,
are never deleted. Images with no catalog row are left alone (see
'hpcckpt catalog rebuild'). Retention also runs after every checkpoint.

As root, gc covers every user in the store, or one with --user.

examples:
  hpcckpt gc --dry-run          # show what would go
  hpcckpt gc --keep-last 2      # override the policy's keep_last
  hpcckpt gc --json | jq .retention.bytes_freed
"""

_OVERRIDES = (
    ("keep_last", "--keep-last", "N", "keep each job's N newest images"),
    ("keep_every", "--keep-every", "K", "also keep every Kth image of a job (0: off)"),
    ("max_age", "--max-age", "DURATION", "delete images older than this (e.g. 14d)"),
    ("max_bytes", "--max-bytes", "SIZE", "per-user budget for all images (e.g. 500G)"),
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "gc", help="clean leftovers and apply retention", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-n", "--dry-run", action="store_true", help="only report what would be removed")
    p.add_argument("--user", metavar="NAME", help="(root) only this user's store")
    p.add_argument(
        "--grace", metavar="DURATION", default=None,
        help=f"age before a dead writer's leftovers go (default {int(DEFAULT_GRACE_S)}s)",
    )
    p.add_argument(
        "--stale-after", metavar="DURATION", default=None,
        help="age before a writer on another node is presumed dead "
        f"(default {int(DEFAULT_STALE_AFTER_S // 3600)}h)",
    )
    for key, flag, metavar, text in _OVERRIDES:
        p.add_argument(flag, dest=key, metavar=metavar, default=None, help=text)
    add_store_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def _summary(user: str, rep: GcReport) -> str:
    verb = "would remove" if rep.dry_run else "removed"
    ret = rep.retention
    lines = [
        f"{user}: {verb} {len(rep.removed_files)} leftover file(s), "
        f"{'would fail' if rep.dry_run else 'failed'} {len(rep.failed_rows)} dead checkpoint(s), "
        f"retention {'would delete' if rep.dry_run else 'deleted'} {len(ret.deleted) if ret else 0} image(s) "
        f"({human_size(ret.bytes_freed if ret else 0)})"
    ]
    for f in rep.removed_files:
        lines.append(f"  {verb} {f['path']}: {f['reason']}")
    for r in ret.deleted if ret else []:
        lines.append(f"  retention: checkpoint {r.ckptid} of job {r.job_id} ({human_size(r.size_bytes)})")
    for e in rep.errors:
        lines.append(f"  error: {e}")
    return "\n".join(lines) + "\n"


def _duration(flag: str, text: str | None, default: float) -> float:
    if not text:
        return default
    try:
        return float(parse_duration(text))
    except ValueError:
        raise UsageError(f"{flag}: not a duration: {text!r}", hint="write seconds or e.g. 10m, 2h, 1d") from None


def run(args: argparse.Namespace) -> int:
    cli = {f"retention.{key}": getattr(args, key) for key, *_ in _OVERRIDES if getattr(args, key) is not None}
    flags = {f"retention.{key}": flag for key, flag, *_ in _OVERRIDES}
    site = Site.load(store=args.store, catalog=args.catalog, policy_file=args.policy, cli=cli, cli_flags=flags)
    grace = _duration("--grace", args.grace, DEFAULT_GRACE_S)
    stale = _duration("--stale-after", args.stale_after, DEFAULT_STALE_AFTER_S)
    docs: list[dict[str, Any]] = []
    errors = 0
    for user in target_users(site.store_root, current_user(), args.user):
        if not has_catalog(site, user):
            continue  # nothing was ever published for this user
        with site.opened(user) as (cat, store):
            rep = collect_garbage(cat, store, site.retention, dry_run=args.dry_run, grace=grace, stale_after=stale)
        errors += len(rep.errors)
        if args.json:
            docs.append(dict(rep.to_dict(), user=user.name))
        else:
            sys.stdout.write(_summary(user.name, rep))
    if args.json:
        print_json(docs)
    return EXIT_OK if errors == 0 else EXIT_STORE
