"""Hostile YAML in a policy: recursive aliases, deep nesting and alias bombs are policy errors.

Each names the file and the line where the bound was crossed, comes quickly,
and never expands anything: the composer stops before a node graph is built
that would exhaust the stack (RecursionError) or memory (a billion laughs).
"""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hpcckpt.exitcodes import EXIT_POLICY
from hpcckpt.policy import build_policy
from hpcckpt.policy.diagnostics import PolicyInvalidError
from hpcckpt.policy.source import MAX_ALIASES, MAX_DEPTH, MAX_NODES, parse_yaml

Write = Callable[[str, str], Path]
REPO = Path(__file__).resolve().parents[2]

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""

DEEP = 100_000
HOSTILE = {
    "recursive_seq": ("interval: 1h\nx: &a [1, *a]\n", 2, "recursive alias"),
    "recursive_map": ("interval: 1h\nx: &a\n  y:\n    z: *a\n", 4, "recursive alias"),
    "deep_flow": ("interval: " + "[" * DEEP + "]" * DEEP + "\n", 1, f"more than {MAX_DEPTH} levels"),
    "deep_block": ("x:\n  " + "- " * DEEP + "1\n", 2, f"more than {MAX_DEPTH} levels"),
    "deep_mapping": ("x: " + "{a: " * DEEP + "1" + "}" * DEEP + "\n", 1, f"more than {MAX_DEPTH} levels"),
    "billion_laughs": (BILLION_LAUGHS, 5, f"more than {MAX_NODES} values"),
    "many_aliases": ("a: &a 1\nb: [" + ", ".join(["*a"] * (MAX_ALIASES + 1)) + "]\n", 2,
                     f"more than {MAX_ALIASES} aliases"),
}


# The alias bomb runs only in the memory-limited subprocess below: should the bound ever regress,
# expanding it here would take the test process's (and the machine's) memory.
@pytest.mark.parametrize("name", sorted(set(HOSTILE) - {"billion_laughs"}))
def test_hostile_yaml_is_a_policy_error_with_file_and_line(name: str, write: Write) -> None:
    text, line, words = HOSTILE[name]
    path = write(f"{name}.yaml", text)
    with pytest.raises(PolicyInvalidError) as info:
        build_policy(path, None, {})
    [diag] = info.value.diagnostics
    assert diag.loc.file == str(path) and diag.loc.line == line, diag
    assert words in diag.message
    assert f"{path}:{line}:" in info.value.render()


def test_aliases_within_bounds_still_work() -> None:
    text = "base: &b {keep_last: 3}\nother: *b\nlist: &l [1, 2]\nagain: [*l, *l]\n"
    tree, diags = parse_yaml(text, file="ok.yaml", layer="user")
    assert not diags and tree is not None
    assert tree.plain() == {"base": {"keep_last": 3}, "other": {"keep_last": 3}, "list": [1, 2],
                            "again": [[1, 2], [1, 2]]}
    nested = "x: " + "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1) + "\n"
    assert parse_yaml(nested, file="deep.yaml", layer="user")[1] == []


def _limit_memory() -> None:
    # Enough for the interpreter and a policy; far too little for an expanded alias bomb.
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("name", ["billion_laughs", "deep_flow", "recursive_map"])
def test_policy_check_cli_with_bounded_memory(name: str, write: Write) -> None:
    """The real command, in 1 GiB of address space: an exit 3 naming the line, not a traceback or a hang."""
    text, line, _ = HOSTILE[name]
    path = write(f"{name}.yaml", text)
    proc = subprocess.run([sys.executable, "-m", "hpcckpt", "policy", "check", str(path)],
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HPCCKPT_LOG_FORMAT": "human"},
                          capture_output=True, text=True, timeout=120, check=False, preexec_fn=_limit_memory)
    assert proc.returncode == EXIT_POLICY, proc.stdout + proc.stderr
    assert f"{path}:{line}:" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_control_character_is_a_policy_error(write: Write) -> None:
    """YAML's reader refuses control characters before parsing; that was a ReaderError traceback."""
    path = write("ctl.yaml", "interval: 1h\nretention: {keep_last: 3\x08}\n")
    with pytest.raises(PolicyInvalidError) as info:
        build_policy(path, None, {})
    [diag] = info.value.diagnostics
    assert (diag.loc.line, diag.loc.col) == (2, 25) and "U+0008" in diag.message
