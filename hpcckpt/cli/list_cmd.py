"""`hpcckpt list` (not yet implemented)."""

from __future__ import annotations

import argparse
from typing import Any

from hpcckpt.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("list", help="(not yet implemented)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UsageError("'hpcckpt list' is not implemented yet")
