"""`hpcckpt doctor`: check that this node can checkpoint."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hpcckpt.cli.common import add_json_arg, add_store_args, print_json
from hpcckpt.core import doctor
from hpcckpt.exitcodes import EXIT_ENGINE, EXIT_OK
from hpcckpt.store.site import Site

HELP = """\
Check what checkpointing needs on this node: the CRIU binary, its version and
'criu check', PID namespaces, soft-dirty memory tracking, the store and the
catalog; Slurm and mpi4py are reported for information.

Exits 0 only when 'hpcckpt run' can really checkpoint here, 8 otherwise.
Set HPCCKPT_CRIU to use a particular criu binary.

examples:
  hpcckpt doctor
  hpcckpt doctor --json | jq '.checks[] | select(.ok | not)'
  HPCCKPT_CRIU=/opt/criu/sbin/criu hpcckpt doctor --store /scratch/$USER/ckpt
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="check that this node can checkpoint",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_store_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    site = Site.load(store=args.store, catalog=args.catalog, policy_file=args.policy)
    inputs = doctor.default_inputs(site)
    checks = doctor.run_checks(inputs)
    ok = doctor.all_required_ok(checks)
    if args.json:
        print_json({"ok": ok, "checks": [c.to_dict() for c in checks]})
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "--  ")
            sys.stdout.write(f"[{mark}] {c.name:20s} {c.detail}\n")
            if not c.ok and c.fix:
                sys.stdout.write(f"       {'':20s} fix: {c.fix}\n")
        sys.stdout.write(
            "\nthis node can checkpoint\n" if ok else "\nthis node cannot checkpoint yet: see the FAIL lines\n"
        )
    return EXIT_OK if ok else EXIT_ENGINE
