"""Helpers shared by the subcommand modules: common flags and output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EPILOG_EXIT_CODES = (
    "exit codes: 0 ok, 2 usage, 3 policy, 4 corrupt image, 5 unreadable image, 6 catalog,\n"
    "  7 store, 8 CRIU, 9 incompatible node, 10 permission, 11 not found, 12 Slurm, 13 MPI,\n"
    "  14 runner unreachable, 85 checkpointed and stopped (requeue me), 141 output pipe closed.\n"
    "  See docs/cli.md."
)


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="DIR",
        help="store root (default: $HPCCKPT_STORE, the policy's storage.root, "
        "or ~/.local/share/hpcckpt/store)",
    )
    p.add_argument(
        "--catalog",
        metavar="URL",
        help="catalog: a SQLite path or postgresql://... (default: $HPCCKPT_CATALOG, "
        "or STORE/USER/catalog.sqlite)",
    )
    p.add_argument("--policy", metavar="FILE", help="user policy file (default: $HPCCKPT_POLICY)")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, default=str, sort_keys=False)
    sys.stdout.write("\n")


def formatter() -> type[argparse.RawDescriptionHelpFormatter]:
    return argparse.RawDescriptionHelpFormatter
