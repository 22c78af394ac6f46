"""`hpcckpt policy`: show the effective policy, check policy files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hpcckpt.cli.common import add_json_arg, formatter, print_json
from hpcckpt.exitcodes import EXIT_OK, EXIT_POLICY
from hpcckpt.policy import load_policy, parse_set_options, site_policy_path
from hpcckpt.policy.report import check_files, render_table, render_yaml, to_json

DESCRIPTION = """\
Policies steer checkpointing: interval, storage, retention, preemption,
failures, CRIU options. Layers, each overriding the one before: built-in
defaults; the site policy (/etc/hpcckpt/policy.yaml or $HPCCKPT_SITE_POLICY),
which may lock keys and bound values; your policy (--policy or
$HPCCKPT_POLICY); command-line flags. Every key: docs/policy.md and
configs/default.yaml.
"""

SHOW_EPILOG = """\
examples:
  hpcckpt policy show                          # effective policy, as a policy file
  hpcckpt policy show --effective              # ... with where each value came from
  hpcckpt policy show --policy my.yaml --set interval=10m --json
"""

CHECK_EPILOG = """\
Reports every problem as FILE:LINE:COL: KEY: what was expected. Exit status 3
when any file is invalid.

examples:
  hpcckpt policy check ~/ckpt.yaml             # also against the site's locks and bounds
  hpcckpt policy check --site /etc/hpcckpt/policy.yaml
"""


def register(sub: Any) -> None:
    p = sub.add_parser("policy", help="show the effective policy, check policy files",
                       description=DESCRIPTION, epilog=SHOW_EPILOG + "\n" + CHECK_EPILOG.split("examples:\n")[1],
                       formatter_class=formatter())
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION")

    show = psub.add_parser("show", help="print the effective policy", description=DESCRIPTION,
                           epilog=SHOW_EPILOG, formatter_class=formatter())
    show.add_argument("--effective", action="store_true",
                      help="list every key with its value and origin (default, site, user, cli), locks, "
                           "bounds and the policy digest")
    show.add_argument("--policy", metavar="FILE", help="user policy file (default: $HPCCKPT_POLICY)")
    show.add_argument("--site-policy", metavar="FILE",
                      help="site policy file (default: $HPCCKPT_SITE_POLICY or /etc/hpcckpt/policy.yaml)")
    show.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                      help="override a key as a command-line flag would, e.g. --set retention.keep_last=5")
    add_json_arg(show)
    show.set_defaults(func=run_show)

    check = psub.add_parser("check", help="validate policy files, reporting every problem",
                            description=DESCRIPTION, epilog=CHECK_EPILOG, formatter_class=formatter())
    check.add_argument("files", metavar="FILE", nargs="+", type=Path, help="policy files to check")
    check.add_argument("--site", action="store_true",
                       help="the files are site policies (may have locks, bounds and site keys)")
    check.add_argument("--site-policy", metavar="FILE",
                       help="check user policies against this site policy (default: the installed one)")
    add_json_arg(check)
    check.set_defaults(func=run_check)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def run_show(args: argparse.Namespace) -> int:
    overrides = parse_set_options(args.set)
    flags = {key: f"--set {key}" for key in overrides}
    pol = load_policy(
        Path(args.policy) if args.policy else None,
        Path(args.site_policy) if args.site_policy else None,
        overrides,
        cli_flags=flags,
    )
    if args.json:
        print_json(to_json(pol))
    elif args.effective:
        sys.stdout.write(render_table(pol))
    else:
        sys.stdout.write(render_yaml(pol))
    return EXIT_OK


def run_check(args: argparse.Namespace) -> int:
    site = Path(args.site_policy) if args.site_policy else (None if args.site else site_policy_path())
    results = check_files(args.files, as_site=args.site, site_file=site)
    if args.json:
        print_json({"files": {f: {"valid": not errs, "errors": errs} for f, errs in results.items()}})
    else:
        for file, errs in results.items():
            if errs:
                sys.stdout.write("".join(f"{e}\n" for e in errs))
            else:
                sys.stdout.write(f"{file}: ok\n")
    return EXIT_POLICY if any(results.values()) else EXIT_OK
