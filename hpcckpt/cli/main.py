"""Entry point of the ``hpcckpt`` command."""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Sequence

from hpcckpt import __version__
from hpcckpt import log as hlog
from hpcckpt.cli.common import EPILOG_EXIT_CODES
from hpcckpt.errors import HpcckptError
from hpcckpt.exitcodes import EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_USAGE

# One module per subcommand, in the order `--help` lists them.
SUBCOMMANDS = (
    "run",
    "checkpoint",
    "resume",
    "list",
    "status",
    "report",
    "metrics",
    "info",
    "verify",
    "gc",
    "catalog",
    "image",
    "policy",
    "doctor",
    "slurm",
    "drain",
    "migrate",
)

DESCRIPTION = """\
Transparent checkpoint/restart for HPC batch jobs.

Run a job under hpcckpt, and it is checkpointed every interval (CRIU
underneath); when Slurm preempts or requeues it, or its node dies, it resumes
from its latest valid image, on any node.

examples:
  hpcckpt run --interval 10m -- ./simulate input.nml      # checkpoint every 10 minutes
  hpcckpt list                                            # your checkpoints
  hpcckpt resume 4242                                     # restart job 4242 from its latest image
  hpcckpt doctor                                          # can this node checkpoint?
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcckpt",
        description=DESCRIPTION,
        epilog=EPILOG_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hpcckpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"hpcckpt.cli.{name}_cmd")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. A reader that went away ends it quietly, as any Unix filter."""
    try:
        try:
            return _main(argv)
        finally:
            # Flush here, where a closed pipe can still be handled, not at interpreter exit,
            # where it would print "Exception ignored ... BrokenPipeError" and exit 120.
            sys.stdout.flush()
    except BrokenPipeError:
        _drop_closed_output()
        return EXIT_BROKEN_PIPE


def _output_closed(fd: int) -> bool:
    """Whether ``fd`` is a pipe or socket whose reader has gone (writing it would fail with EPIPE)."""
    poller = select.poll()
    try:
        poller.register(fd, select.POLLOUT)
    except (OSError, ValueError):
        return False
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _drop_closed_output() -> None:
    """Point closed stdout/stderr at /dev/null, so what is still buffered for them goes nowhere, silently."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):  # replaced by a test harness
                continue
            if stream is sys.stdout or _output_closed(fd):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = "DEBUG" if args.verbose else ("WARNING" if args.quiet else None)
    logger = hlog.setup(level)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(func(args))
    except HpcckptError as err:
        sys.stderr.write(f"hpcckpt: error: {err.render()}\n")
        return err.exit_code
    except BrokenPipeError:
        if any(_output_closed(fd) for fd in (1, 2)):
            raise  # our own output's reader went away: main() ends quietly
        logger.exception("internal error; please report it with this traceback")
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        sys.stderr.write("hpcckpt: interrupted\n")
        return 130
    except Exception:  # a bug: show it, with the documented exit code
        logger.exception("internal error; please report it with this traceback")
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
