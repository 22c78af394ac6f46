"""What every fuzzer here shares: rounds of hypothesis examples for a time, with peak memory bounded."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable

# Memory the code under test may use beyond what the harness had at start: a few bounded buffers,
# never anything sized by the input; a round that grows the peak RSS by more is a bug.
MEMORY_SLACK = 256 << 20


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(round_of: Callable[[int], Callable[[], None]], seconds: float, batch: int) -> int:
    """Run ``round_of(batch)()`` until about ``seconds`` have passed; returns the number of inputs tried."""
    start_rss = rss_bytes()
    deadline = time.monotonic() + seconds
    tried = 0
    while time.monotonic() < deadline:
        round_of(batch)()
        tried += batch
        grown = rss_bytes() - start_rss
        assert grown < MEMORY_SLACK, f"peak memory grew by {grown >> 20} MiB"
    return tried


def main(doc: str | None, what: str, fuzz: Callable[[float, int], int], *, seconds: float, batch: int,
         argv: list[str] | None = None) -> int:
    """The command line of a fuzzer: ``--seconds``, ``--batch``, and one line saying what it tried."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=seconds, help=f"how long to fuzz (default {seconds:g})")
    ap.add_argument("--batch", type=int, default=batch, help="hypothesis examples per round")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    tried = fuzz(args.seconds, args.batch)
    sys.stdout.write(f"fuzzed {tried} {what} in {time.monotonic() - t0:.0f} s, peak RSS {rss_bytes() >> 20} MiB: "
                     "no failure\n")
    return 0
