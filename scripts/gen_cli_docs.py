"""Write docs/cli.md from the parser itself, so the reference never drifts.

Usage: .venv/bin/python scripts/gen_cli_docs.py [--check]
With --check, exit 1 when docs/cli.md differs from what would be written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpcckpt import exitcodes  # noqa: E402
from hpcckpt.cli.main import build_parser  # noqa: E402

HEADER = """\
# Command reference

Generated from the parser by `scripts/gen_cli_docs.py`; do not edit by hand.
Every command also prints this with `--help`.

## Environment

| variable | what it sets |
|---|---|
| `HPCCKPT_STORE` | the store root (else `--store`, the policy's `storage.root`, `~/.local/share/hpcckpt/store`) |
| `HPCCKPT_CATALOG` | the catalog: a SQLite path or `postgresql://...` (default: `STORE/USER/catalog.sqlite`) |
| `HPCCKPT_POLICY` | your policy file (like `--policy`) |
| `HPCCKPT_SITE_POLICY` | the site policy (default `/etc/hpcckpt/policy.yaml`) |
| `HPCCKPT_CRIU` | the criu binary to use (default: looked up on PATH, `/usr/local/sbin`, `/usr/sbin`) |
| `HPCCKPT_STAGING` | node-local disk staging (like policy `storage.staging`) |
| `HPCCKPT_LOG_FORMAT` | `json`, `human` or `auto` (JSON lines when stderr is not a terminal) |
| `HPCCKPT_LOG_LEVEL` | `DEBUG`, `INFO` (default), `WARNING`, `ERROR` |
| `HPCCKPT_PROGRESS` | `always`, `never` or `auto` (a progress line on stderr at a terminal) |
| `HPCCKPT_RESUME_FROM` | set by `resume --submit`: the job whose latest image `hpcckpt run` restores |

Set by `hpcckpt run` for the job: `HPCCKPT_JOB_ID`, `HPCCKPT_STORE`,
`HPCCKPT_CKPT_INTERVAL`; by `run --engine app` at a restart: `HPCCKPT_RESTART=1`
and `HPCCKPT_CKPTID`.

## Exit codes

"""


def _help_text(parser: argparse.ArgumentParser) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        parser.print_help()
    return buf.getvalue().rstrip()


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...], out: list[str]) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                full = (*path, name)
                out.append(f"## hpcckpt {' '.join(full)}\n\n```text\n{_help_text(child)}\n```\n")
                _walk(child, full, out)


def render() -> str:
    # A fixed width, so the file does not depend on the terminal that made it.
    os.environ["COLUMNS"] = "100"
    parser = build_parser()
    doc = (exitcodes.__doc__ or "").split("\n\n", 1)[1].strip()
    parts = [HEADER + "```text\n" + doc + "\n```\n", f"## hpcckpt\n\n```text\n{_help_text(parser)}\n```\n"]
    _walk(parser, (), parts)
    return "\n".join(parts)


def main() -> int:
    target = REPO / "docs" / "cli.md"
    text = render()
    if "--check" in sys.argv[1:]:
        current = target.read_text() if target.exists() else ""
        if current != text:
            sys.stderr.write("docs/cli.md is out of date: run scripts/gen_cli_docs.py\n")
            return 1
        return 0
    target.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
