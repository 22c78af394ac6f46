"""`hpcckpt doctor`: check that this node can checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hpcckpt.core import doctor
from hpcckpt.cli.common import add_json_arg, add_store_args, print_json
from hpcckpt.exitcodes import EXIT_ENGINE, EXIT_OK

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


def _policy_store_root(policy_file: str | None) -> str | None:
    from hpcckpt.policy import load_policy

    return load_policy(user_file=Path(policy_file) if policy_file else None).storage.root


def run(args: argparse.Namespace) -> int:
    policy_root = None if args.store else _policy_store_root(args.policy)
    inputs = doctor.default_inputs(args.store, args.catalog, policy_root)
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
