"""The effective policy for people and scripts: ``hpcckpt policy show`` and ``check``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from hpcckpt.errors import PolicyError
from hpcckpt.policy.diagnostics import PolicyInvalidError
from hpcckpt.policy.loader import build_policy
from hpcckpt.policy.model import Policy
from hpcckpt.policy.schema import FIELDS


def rows(pol: Policy) -> list[tuple[str, str, str]]:
    """(key, value as one would write it, origin) for every key, in schema order."""
    out = []
    for path, fld in FIELDS.items():
        origin = pol.origin(path)
        if pol.is_locked(path):
            origin += " (locked)"
        out.append((path, fld.kind.show(pol.get(path)), origin))
    return out


def render_table(pol: Policy) -> str:
    table = rows(pol)
    width = max(len(k) for k, _, _ in table)
    vwidth = min(max(len(v) for _, v, _ in table), 40)
    lines = [f"{k:<{width}}  {v:<{vwidth}}  {o}" for k, v, o in table]
    for path, bound in pol.bounds.items():
        kind = FIELDS[path].kind
        lo = kind.show(bound.minimum) if bound.minimum is not None else "-"
        hi = kind.show(bound.maximum) if bound.maximum is not None else "-"
        lines.append(f"bound {path}: min {lo}, max {hi}  ({bound.origin})")
    lines.append(f"digest {pol.digest()}")
    return "\n".join(lines) + "\n"


def render_yaml(pol: Policy) -> str:
    """The effective values as a policy file, durations and sizes spelled as people write them."""
    lines: list[str] = []
    previous: list[str] = []
    for path, fld in FIELDS.items():
        *parents, leaf = path.split(".")
        common = 0
        while common < min(len(parents), len(previous)) and parents[common] == previous[common]:
            common += 1
        for depth in range(common, len(parents)):
            lines.append("  " * depth + f"{parents[depth]}:")
        previous = parents
        value = pol.get(path)
        lines.append("  " * len(parents) + f"{leaf}: {_yaml_value(value, fld.kind.show(value))}")
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any, shown: str) -> str:
    """Quote a string when YAML would read it back as something else (a path with ': ' or '#')."""
    if not isinstance(value, str):
        return shown
    try:
        same = yaml.safe_load(shown) == value
    except yaml.YAMLError:
        same = False
    return shown if same else json.dumps(value)


def to_json(pol: Policy) -> dict[str, Any]:
    return {
        "policy": pol.to_dict(),
        "origins": dict(pol.origins),
        "locks": list(pol.locks),
        "bounds": {p: {"min": b.minimum, "max": b.maximum, "origin": b.origin} for p, b in pol.bounds.items()},
        "sources": list(pol.sources),
        "digest": pol.digest(),
    }


def check_files(files: Sequence[Path], *, as_site: bool, site_file: Path | None = None) -> dict[str, list[str]]:
    """Every problem in each file, one line each, by file name (an empty list: the file is valid).

    A site policy is checked alone. A user policy is checked with ``site_file``
    (the installed site policy, by default), so that locks and bounds count too.
    """
    out: dict[str, list[str]] = {}
    for file in files:
        try:
            if as_site:
                build_policy(None, file, {})
            else:
                build_policy(file, site_file, {})
            out[str(file)] = []
        except PolicyInvalidError as err:
            out[str(file)] = [str(d) for d in err.diagnostics]
        except PolicyError as err:  # unreadable, not UTF-8, unsafe: the message names the file
            out[str(file)] = [err.message]
    return out
