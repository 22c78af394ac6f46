"""Fuzz the policy loader (hypothesis-driven).

Run standalone for as long as you like::

    .venv/bin/python -m tests.fuzz.fuzz_policy --seconds 600

Inputs are policy files: valid ones with keys, values and structure mutated,
YAML constructs a user (or an attacker, for a policy root reads) may write
(anchors and aliases, tags, deep nesting, merge keys, odd scalars), and raw
bytes. Loading one as a user or a site policy must either give a Policy or
raise PolicyError, in bounded time and memory; any other exception is a bug.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcckpt.errors import PolicyError
from hpcckpt.policy import build_policy
from hpcckpt.policy.schema import FIELDS
from tests.fuzz import driver

INPUT_DEADLINE_S = 2.0

_keys = st.sampled_from(sorted(FIELDS))
_scalar = st.one_of(
    st.sampled_from(["1h", "10m", "auto", "0", "-1", "1e400", "nan", ".inf", "~", "null", "true", "yes", "0x1F",
                     "1_000", "2**64", "18446744073709551616", "'quoted'", '"\\u0000"', "!!binary aGk=",
                     "!!python/object:os.system ls", "!!timestamp 2001-12-14", "[]", "{}", "*undefined", "&x 1",
                     "zstd", "lz4", "none", "TERM", "SIGKILL", "99999999999999999999999", "ü", "\u202e"]),
    st.text(max_size=12).map(lambda t: repr(t)),
    st.integers().map(str),
)


@st.composite
def structured(draw: st.DrawFn) -> str:
    """A policy of dotted keys written nested, with hostile scalars and YAML features mixed in."""
    lines = []
    anchors: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        parts = draw(_keys).split(".")
        if draw(st.booleans()):
            parts[-1] = draw(st.sampled_from([parts[-1] + "x", "", "<<", "1", "a b", "locks", "bounds"]))
        value = draw(_scalar)
        op = draw(st.sampled_from(["plain", "anchor", "alias", "flow", "seq"]))
        if op == "anchor":
            name = f"a{len(anchors)}"
            anchors.append(name)
            value = f"&{name} {value}"
        elif op == "alias" and anchors:
            value = f"*{draw(st.sampled_from(anchors))}"
        elif op == "flow":
            value = "[" + ", ".join(draw(st.lists(_scalar, max_size=4))) + "]"
        elif op == "seq":
            value = "{" + ", ".join(f"k{i}: {v}" for i, v in enumerate(draw(st.lists(_scalar, max_size=3)))) + "}"
        indent = ""
        for part in parts[:-1]:
            lines.append(f"{indent}{part}:")
            indent += draw(st.sampled_from(["  ", "    ", " \t"]))
        lines.append(f"{indent}{parts[-1]}: {value}")
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n---\n", "\n...\n", "\n%YAML 1.1\n"]))


@st.composite
def nesting(draw: st.DrawFn) -> str:
    depth = draw(st.integers(1, 3000))
    kind = draw(st.sampled_from(["flow", "block", "map", "alias-chain"]))
    if kind == "flow":
        return "interval: " + "[" * depth + "]" * draw(st.sampled_from([depth, 0, depth // 2]))
    if kind == "block":
        return "x:\n  " + "- " * depth + "1\n"
    if kind == "map":
        return "x: " + "{a: " * depth + "1" + "}" * depth
    width = draw(st.integers(2, 12))
    out = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, min(depth, 40)):
        out.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(out) + "\n"


inputs = st.one_of(
    structured(),
    nesting(),
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
)


def check_input(text: str, scratch: Path, as_site: bool) -> None:
    path = scratch / "policy.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    t0 = time.monotonic()
    try:
        if as_site:
            build_policy(None, path, {})
        else:
            build_policy(path, None, {})
    except PolicyError as err:
        assert err.exit_code == 3 and str(err), "a policy error must say what is wrong"
    assert time.monotonic() - t0 < INPUT_DEADLINE_S, "policy loader too slow on a small input"


def make_test(max_examples: int) -> Callable[[], None]:
    @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(text=inputs, as_site=st.booleans())
    def fuzz(text: str, as_site: bool) -> None:
        scratch = Path(tempfile.mkdtemp(prefix="hpcckpt-fuzz-policy-"))
        try:
            check_input(text, scratch, as_site)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    return fuzz


def run(seconds: float, batch: int = 200) -> int:
    """Fuzz for about ``seconds``; returns the number of inputs tried."""
    return driver.run(make_test, seconds, batch)


def main(argv: list[str] | None = None) -> int:
    return driver.main(__doc__, "policies", run, seconds=30.0, batch=200, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
