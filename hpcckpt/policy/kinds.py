"""The kinds of value a policy key can hold, each with its parser and its wording.

A kind turns what YAML (or a command-line flag) gave into the value the policy
keeps, or raises :class:`Invalid` whose text completes the sentence
"expected ..., got ...". ``from_text`` is true for command-line values, which
arrive as strings: there ``"3"`` is an integer and ``"yes"`` a boolean, while in
a YAML file the type YAML gives is the type the user wrote.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hpcckpt.policy.diagnostics import did_you_mean, show_value
from hpcckpt.policy.units import format_duration, format_size, parse_duration, parse_size


class Invalid(ValueError):
    """A value does not fit its key; ``expected`` describes what would."""

    def __init__(self, expected: str, got: Any, *, suffix: str = "") -> None:
        self.expected = expected
        self.got = got
        self.suffix = suffix
        super().__init__(self.text())

    def text(self) -> str:
        return f"expected {self.expected}, got {show_value(self.got)}{self.suffix}"


class Kind:
    """Base: subclasses set ``expected`` and override ``parse``."""

    expected = "a value"
    nullable = False
    numeric = False  # may be bounded by the site's ``bounds``

    def parse(self, raw: Any, *, from_text: bool) -> Any:
        raise NotImplementedError

    def check(self, raw: Any, *, from_text: bool) -> Any:
        if raw is None or (from_text and isinstance(raw, str) and raw.lower() in ("null", "none", "~")):
            if self.nullable:
                return None
            raise Invalid(self.expected, None)
        return self.parse(raw, from_text=from_text)

    def show(self, value: Any) -> str:
        """The value as a person would write it in a policy file."""
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):
            return "[" + ", ".join(str(v) for v in value) + "]"
        return str(value)


def _is_int(raw: Any) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


@dataclass
class IntKind(Kind):
    minimum: int = 0
    maximum: int | None = None
    nullable: bool = False
    numeric = True

    @property
    def expected(self) -> str:  # type: ignore[override]
        if self.maximum is not None:
            return f"an integer from {self.minimum} to {self.maximum}"
        if self.minimum == 0:
            return "a non-negative integer"
        if self.minimum == 1:
            return "a positive integer"
        return f"an integer >= {self.minimum}"

    def parse(self, raw: Any, *, from_text: bool) -> int:
        value = raw
        if from_text and isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                raise Invalid(self.expected, raw) from None
        if not _is_int(value):
            raise Invalid(self.expected, raw)
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            raise Invalid(self.expected, raw)
        return int(value)


@dataclass
class FloatKind(Kind):
    minimum: float = 0.0
    numeric = True

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"a number >= {self.minimum:g}"

    def parse(self, raw: Any, *, from_text: bool) -> float:
        value = raw
        if from_text and isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise Invalid(self.expected, raw) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(self.expected, raw)
        if not math.isfinite(value) or value < self.minimum:
            raise Invalid(self.expected, raw)
        return float(value)


class BoolKind(Kind):
    expected = "true or false"
    _TEXT = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

    def parse(self, raw: Any, *, from_text: bool) -> bool:
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str) and raw.strip().lower() in self._TEXT:
            return self._TEXT[raw.strip().lower()]
        raise Invalid(self.expected, raw)


@dataclass
class EnumKind(Kind):
    choices: Sequence[str] = ()
    lower: bool = False  # accept any case, keep lowercase (log levels)
    # YAML reads a bare on/off (yes/no, true/false) as a boolean: the choices those stand for, if any
    bools: tuple[str, str] | None = None

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(f"'{c}'" for c in self.choices)

    def parse(self, raw: Any, *, from_text: bool) -> str:
        if isinstance(raw, bool) and self.bools is not None:
            return self.bools[0] if raw else self.bools[1]
        if not isinstance(raw, str):
            raise Invalid(self.expected, raw)
        value = raw.lower() if self.lower else raw
        if value not in self.choices:
            raise Invalid(self.expected, raw, suffix=did_you_mean(value, self.choices))
        return value


@dataclass
class DurationKind(Kind):
    minimum: int = 0
    nullable: bool = False
    allow_auto: bool = False
    numeric = True

    @property
    def expected(self) -> str:  # type: ignore[override]
        what = "a duration such as 30, 30s, 10m, 1h30m or 2d"
        if self.allow_auto:
            what += ", or 'auto'"
        if self.minimum > 0:
            what += f", of at least {format_duration(self.minimum)}"
        return what

    def parse(self, raw: Any, *, from_text: bool) -> int | str:
        if self.allow_auto and isinstance(raw, str) and raw.strip().lower() == "auto":
            return "auto"
        if _is_int(raw):
            value = int(raw)
        elif isinstance(raw, str):
            try:
                value = parse_duration(raw)
            except ValueError:
                raise Invalid(self.expected, raw, suffix=did_you_mean(raw.lower(), ["auto"]) if
                              self.allow_auto else "") from None
        else:
            raise Invalid(self.expected, raw)
        if value < self.minimum:
            raise Invalid(self.expected, raw)
        return value

    def show(self, value: Any) -> str:
        return format_duration(value) if _is_int(value) else super().show(value)


@dataclass
class SizeKind(Kind):
    minimum: int = 0
    maximum: int | None = None
    nullable: bool = False
    numeric = True

    @property
    def expected(self) -> str:  # type: ignore[override]
        what = "a size such as 4096, 64MiB, 500G or 1.5TiB"
        if self.maximum is not None:
            return f"{what}, from {format_size(self.minimum)} to {format_size(self.maximum)}"
        if self.minimum > 0:
            what += f", of at least {format_size(self.minimum)}"
        return what

    def parse(self, raw: Any, *, from_text: bool) -> int:
        if _is_int(raw):
            value = int(raw)
        elif isinstance(raw, str):
            try:
                value = parse_size(raw)
            except ValueError:
                raise Invalid(self.expected, raw) from None
        else:
            raise Invalid(self.expected, raw)
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            raise Invalid(self.expected, raw)
        return value

    def show(self, value: Any) -> str:
        return format_size(value) if _is_int(value) else super().show(value)


@dataclass
class PathKind(Kind):
    nullable: bool = True
    url_schemes: Sequence[str] = ()  # also accept these URL schemes (catalog)

    @property
    def expected(self) -> str:  # type: ignore[override]
        what = "an absolute path (or ~/...)"
        if self.url_schemes:
            what = "a " + " or ".join(f"{s}://" for s in self.url_schemes) + " URL, or " + what
        return what + (", or null" if self.nullable else "")

    def parse(self, raw: Any, *, from_text: bool) -> str:
        if not isinstance(raw, str) or not raw or "\0" in raw or "\n" in raw:
            raise Invalid(self.expected, raw)
        if any(raw.startswith(f"{s}://") for s in self.url_schemes):
            return raw
        if not (raw.startswith("/") or raw == "~" or raw.startswith("~/")):
            raise Invalid(self.expected, raw)
        return raw


# Signals a preempted job can be warned with; KILL and STOP cannot be caught.
_CATCHABLE = sorted(
    s.name[3:] for s in signal.Signals if s.name.startswith("SIG") and s not in (signal.SIGKILL, signal.SIGSTOP)
)


class SignalListKind(Kind):
    expected = "a non-empty list of signal names such as [TERM, USR1]"

    def parse(self, raw: Any, *, from_text: bool) -> list[str]:
        items = raw
        if from_text and isinstance(raw, str):
            items = [p for p in (x.strip() for x in raw.split(",")) if p]
        if not isinstance(items, list) or not items:
            raise Invalid(self.expected, raw)
        out: list[str] = []
        for item in items:
            if _is_int(item):
                try:
                    item = signal.Signals(item).name
                except ValueError:
                    raise Invalid(f"signal names ({self.expected})", item) from None
            if not isinstance(item, str):
                raise Invalid(self.expected, item)
            name = item.strip().upper()
            name = name[3:] if name.startswith("SIG") else name
            if name not in _CATCHABLE:
                suffix = " (it cannot be caught)" if name in ("KILL", "STOP") else did_you_mean(name, _CATCHABLE)
                raise Invalid("a signal name such as TERM, USR1 or USR2", item, suffix=suffix)
            if name not in out:
                out.append(name)
        return out


@dataclass
class ArgListKind(Kind):
    """Extra command-line options for a tool: a list of strings that start with '-'."""

    expected_text: str = "a list of options such as ['--shell-job']"

    @property
    def expected(self) -> str:  # type: ignore[override]
        return self.expected_text

    def parse(self, raw: Any, *, from_text: bool) -> list[str]:
        items = raw
        if from_text and isinstance(raw, str):
            items = raw.split()
        if not isinstance(items, list):
            raise Invalid(self.expected, raw)
        out: list[str] = []
        for item in items:
            if not isinstance(item, str) or not item.startswith("-") or "\0" in item or "\n" in item:
                raise Invalid("options that start with '-'", item)
            out.append(item)
        return out


class StrListKind(Kind):
    expected = "a list of strings"

    def parse(self, raw: Any, *, from_text: bool) -> list[str]:
        items = raw
        if from_text and isinstance(raw, str):
            items = raw.split()
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise Invalid(self.expected, raw)
        return list(items)
