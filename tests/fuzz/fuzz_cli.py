"""Fuzz the command line (hypothesis-driven): the real parser and dispatch of the harmless commands.

Run standalone for as long as you like::

    .venv/bin/python -m tests.fuzz.fuzz_cli --seconds 600

Each input is an argument vector for ``hpcckpt.cli.main.main``: a command
that only reads (list, info, verify, policy show/check, catalog info, the
help of every command) followed by flags and values a hostile user might
type: huge and negative numbers, unicode digits, empty strings, FIFOs,
directories, devices, symlink loops, unreadable and hostile policy files.
The store and catalog are a throw-away directory. Every input must end in a
documented exit code (returned, or SystemExit from argparse), never 1 (an
internal error), never another exception, never traceback text, and quickly.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcckpt.cli.main import main
from hpcckpt.policy.schema import FIELDS
from tests.fuzz import driver

# Every exit code docs/cli.md lists, but 1 (a bug).
DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 85, 141}
INPUT_DEADLINE_S = 10.0  # a command reads a few small files; only a hang or a blow-up comes near this

COMMANDS: tuple[tuple[str, ...], ...] = (
    ("list",), ("info",), ("verify",), ("policy",), ("policy", "show"), ("policy", "check"), ("catalog", "info"),
    ("catalog", "check"), ("gc", "--dry-run"), ("image",), ("image", "unpack"), (),
)
FLAGS = ("--json", "--all", "-l", "--long", "--user", "--store", "--catalog", "--policy", "--help", "-h",
         "--effective", "--set", "--site", "--site-policy", "-v", "-q", "--version", "--keep-last", "--max-age",
         "--max-bytes", "--grace", "--", "-", "--verify", "--no-such-flag")


class Sandbox:
    """Files a hostile argument may name, in one throw-away directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hpcckpt-fuzz-cli-"))
        r = self.root
        (r / "store").mkdir()
        (r / "dir").mkdir()
        os.mkfifo(r / "fifo")
        (r / "loop").symlink_to(r / "loop")
        (r / "dangling").symlink_to(r / "nowhere")
        (r / "empty.hck").write_bytes(b"")
        (r / "junk.hck").write_bytes(b"\x89HCKPT\r\n" + os.urandom(200))
        (r / "policy.yaml").write_text("interval: 2h\nretention:\n  keep_last: 3\n")
        (r / "site.yaml").write_text("interval: 1h\n")  # not the machine's own /etc/hpcckpt/policy.yaml
        (r / "bomb.yaml").write_text("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
            f"{c}: &{c} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)))
        (r / "recursive.yaml").write_text("x: &x [*x]\n")
        (r / "ctl.yaml").write_text("interval: 1h\x07\n")
        (r / "bad.yaml").write_text("interval: [\n")
        (r / "out").mkdir()
        self.paths = [str(p) for p in (
            r / "dir", r / "fifo", r / "loop", r / "dangling", r / "empty.hck", r / "junk.hck", r / "policy.yaml",
            r / "bomb.yaml", r / "recursive.yaml", r / "ctl.yaml", r / "bad.yaml", r / "nonexistent",
            r / "out" / "new", Path("/dev/null"), Path("/dev/zero"), Path("/proc/nope"), Path("/"),
            r / "store", r / ("x" * 300), r / "dir" / ".." / "policy.yaml",
        )]

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        saved = dict(os.environ)
        for key in list(os.environ):
            if key.startswith(("HPCCKPT_", "SLURM_")):
                del os.environ[key]
        os.environ.update(HPCCKPT_STORE=str(self.root / "store"), HPCCKPT_SITE_POLICY=str(self.root / "site.yaml"),
                          HPCCKPT_LOG_FORMAT="human", HPCCKPT_PROGRESS="never")
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_NUMBERS = st.sampled_from(["0", "-1", "1", "7", "99999999999999999999", "9223372036854775807",
                            "9223372036854775808", "-9223372036854775809", "1e400", "nan", "inf", "0x10", "²",
                            "٣", "\uff11\uff12", "1_000", "3.5", "+5", " 5", "1" * 5000, "10m", "14d", "500G", "-5G"])
_WORDS = st.sampled_from(["", " ", "..", "root", "nobody", "no-such-user", "alice", "postgresql", "retention",
                          "retention.keep_last=5", "interval=1e400", "interval=", "=1", "storage.root=/proc/x",
                          "a.b.c.d=1", "interval=auto", "site.mtbf=1h", "\u202e", "ü", "'", '"', "%s%n", "$HOME",
                          "--json=1", "-vv", "-qv", "@file", "\n", "\t"])


@st.composite
def argv(draw: st.DrawFn, paths: list[str]) -> list[str]:
    out = list(draw(st.sampled_from(COMMANDS)))
    token = st.one_of(st.sampled_from(FLAGS), _NUMBERS, _WORDS, st.sampled_from(paths),
                      st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=20))
    out += draw(st.lists(token, max_size=6))
    if draw(st.booleans()):
        out.insert(0, draw(st.sampled_from(["-v", "-q", "--help", "--version", "-x"])))
    return out


@st.composite
def wellformed(draw: st.DrawFn, paths: list[str]) -> list[str]:
    """A command line argparse accepts, so that the commands themselves meet the hostile values."""
    value = st.one_of(_NUMBERS, _WORDS, st.sampled_from(paths))
    cmd = draw(st.sampled_from(["list", "info", "verify", "show", "check", "catalog", "unpack"]))
    opts: list[str] = draw(st.lists(st.sampled_from(["--json", "-v", "-q"]), max_size=1))
    for flag in ("--store", "--catalog", "--policy"):
        if cmd not in ("check", "unpack") and draw(st.integers(0, 3)) == 0:
            opts += [flag, draw(st.sampled_from(paths))]
    if cmd == "list":
        return ["list", *opts, *draw(st.lists(value, max_size=1)), *draw(st.lists(st.just("--all"), max_size=1))]
    if cmd in ("info", "verify"):
        return [cmd, *opts, *draw(st.lists(value, min_size=1, max_size=1 if cmd == "info" else 3))]
    if cmd == "show":
        sets = draw(st.lists(st.one_of(_WORDS, st.builds(lambda k, v: f"{k}={v}", st.sampled_from(sorted(FIELDS)),
                                                                    _NUMBERS)), max_size=2))
        return ["policy", "show", *opts, *[x for s in sets for x in ("--set", s)]]
    if cmd == "check":
        return ["policy", "check", *draw(st.lists(st.sampled_from(paths), min_size=1, max_size=2))]
    if cmd == "catalog":
        return ["catalog", draw(st.sampled_from(["info", "check"])), *opts]
    return ["image", "unpack", draw(st.sampled_from(paths)), draw(st.sampled_from(paths))]


@contextlib.contextmanager
def _log_to(stream: io.StringIO) -> Iterator[None]:
    """Point the CLI's log handler (set up once per process, on the stderr of then) at ``stream``."""
    from hpcckpt import log as hlog

    hlog.setup()
    handlers = [h for h in hlog.get().handlers if isinstance(h, logging.StreamHandler)]
    saved = [h.stream for h in handlers]
    for h in handlers:
        h.stream = stream  # not setStream(), which flushes the old stream, maybe a closed capture by now
    try:
        yield
    finally:
        for h, old in zip(handlers, saved, strict=True):
            h.stream = old


def check_input(args: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _log_to(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    text = out.getvalue() + err.getvalue()
    shown = [a if len(a) <= 60 else f"{a[:40]}...({len(a)} chars)" for a in args]
    assert "Traceback" not in text, f"{shown!r} printed a traceback:\n{text}"
    assert code in DOCUMENTED, f"{shown!r} exited {code}, not a documented exit code:\n{text}"
    assert time.monotonic() - t0 < INPUT_DEADLINE_S, f"{shown!r} took {time.monotonic() - t0:.1f} s"


def make_test(max_examples: int, sandbox: Sandbox) -> Callable[[], None]:
    @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(args=st.one_of(argv(sandbox.paths), wellformed(sandbox.paths)))
    def fuzz(args: list[str]) -> None:
        with sandbox.environment():
            check_input(args)

    return fuzz


def run(seconds: float, batch: int = 100) -> int:
    """Fuzz for about ``seconds``; returns the number of inputs tried."""
    sandbox = Sandbox()
    try:
        return driver.run(lambda n: make_test(n, sandbox), seconds, batch)
    finally:
        sandbox.close()


def main_(argv_: list[str] | None = None) -> int:
    return driver.main(__doc__, "command lines", run, seconds=30.0, batch=100, argv=argv_)


if __name__ == "__main__":
    raise SystemExit(main_())
