"""Where a policy value came from, and the problems found in it.

Every value in an effective policy carries a :class:`Loc`: the layer it came
from (built-in default, site file, user file, command line) and, for files,
the 1-based line and column. Errors are collected as :class:`Diagnostic`
objects so that one run reports every problem, not only the first.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hpcckpt.errors import PolicyError

LAYER_DEFAULT = "default"
LAYER_SITE = "site"
LAYER_USER = "user"
LAYER_CLI = "cli"


@dataclass(frozen=True)
class Loc:
    layer: str
    file: str | None = None
    line: int = 0  # 1-based; 0 when unknown
    col: int = 0
    flag: str | None = None  # the command-line flag, for the cli layer

    def __str__(self) -> str:
        if self.flag is not None:
            return self.flag
        if self.file is not None:
            return f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        return "built-in defaults"

    def origin(self) -> str:
        """The short form ``Policy.origin`` returns: ``site:/etc/x.yaml:2``, ``cli:--interval``."""
        if self.layer == LAYER_DEFAULT:
            return LAYER_DEFAULT
        if self.flag is not None:
            return f"{self.layer}:{self.flag}"
        return f"{self.layer}:{self.file}:{self.line}" if self.line else f"{self.layer}:{self.file}"


DEFAULT_LOC = Loc(LAYER_DEFAULT)


@dataclass(frozen=True)
class Diagnostic:
    loc: Loc
    message: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.message}"

    def sort_key(self) -> tuple[str, int, int, str]:
        return (str(self.loc.file or self.loc.flag or ""), self.loc.line, self.loc.col, self.message)


class PolicyInvalidError(PolicyError):
    """One or more problems in policy files or flags; ``diagnostics`` holds them all."""

    def __init__(self, diagnostics: Sequence[Diagnostic], *, hint: str | None = None) -> None:
        self.diagnostics = list(diagnostics)
        super().__init__(
            "\n".join(str(d) for d in self.diagnostics),
            hint=hint
            or "fix the lines above; 'hpcckpt policy check FILE' lists every problem in a file "
            "(docs/policy.md describes every key)",
        )


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a probable typo, or None when nothing is close."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    best = suggest(word, candidates)
    return f" (did you mean '{best}'?)" if best else ""


def show_value(value: object) -> str:
    """A value as the user wrote it, for 'got ...' in messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if "'" not in value else '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
