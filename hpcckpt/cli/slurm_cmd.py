"""`hpcckpt slurm` (not yet implemented)."""

from __future__ import annotations

import argparse
from typing import Any

from hpcckpt.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("slurm", help="(not yet implemented)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UsageError("'hpcckpt slurm' is not implemented yet")
