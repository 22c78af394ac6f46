"""The effective policy: built-in defaults, then the site policy, the user policy
and command-line flags, each overriding the one before, within the site's
locks and bounds.

Every problem in every layer is collected and raised together as one
:class:`PolicyInvalidError`, so a user fixes a file in one round rather than
one error per run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.policy.diagnostics import (
    DEFAULT_LOC,
    LAYER_CLI,
    LAYER_DEFAULT,
    LAYER_SITE,
    LAYER_USER,
    Diagnostic,
    Loc,
    PolicyInvalidError,
)
from hpcckpt.policy.layers import Layer, layer_from_cli, layer_from_tree
from hpcckpt.policy.model import SECTION_CLASSES, Bound, Policy
from hpcckpt.policy.schema import CODEC_LEVELS, FIELDS, defaults
from hpcckpt.policy.source import parse_yaml, read_policy_text

_log = hlog.get("policy")

DEFAULT_SITE_POLICY = Path("/etc/hpcckpt/policy.yaml")
ENV_SITE = "HPCCKPT_SITE_POLICY"
ENV_USER = "HPCCKPT_POLICY"


def site_policy_path() -> Path | None:
    """$HPCCKPT_SITE_POLICY, else /etc/hpcckpt/policy.yaml when it exists, else None."""
    env = os.environ.get(ENV_SITE)
    if env:
        return Path(env)
    return DEFAULT_SITE_POLICY if os.path.lexists(DEFAULT_SITE_POLICY) else None


def user_policy_path() -> Path | None:
    env = os.environ.get(ENV_USER)
    return Path(env) if env else None


def load_policy(
    user_file: Path | None = None,
    site_file: Path | None = None,
    cli: Mapping[str, Any] | None = None,
    *,
    cli_flags: Mapping[str, str] | None = None,
    user_uid: int | None = None,
) -> Policy:
    """The effective policy.

    ``user_file`` defaults to $HPCCKPT_POLICY and ``site_file`` to
    :func:`site_policy_path`. ``cli`` maps dotted keys to values as typed on the
    command line (strings are fine); ``cli_flags`` names the flag each came
    from, for messages and origins (default ``--interval`` for top-level keys,
    ``--set a.b`` otherwise). ``user_uid``: when running as root, the uid
    whose user policy file is trusted besides root's.
    """
    return build_policy(
        user_file if user_file is not None else user_policy_path(),
        site_file if site_file is not None else site_policy_path(),
        cli or {},
        cli_flags=cli_flags,
        user_uid=user_uid,
    )


def build_policy(
    user_file: Path | None,
    site_file: Path | None,
    cli: Mapping[str, Any],
    *,
    cli_flags: Mapping[str, str] | None = None,
    user_uid: int | None = None,
) -> Policy:
    """Like :func:`load_policy`, with no environment lookups: None means no such layer."""
    diags: list[Diagnostic] = []
    layers: list[Layer] = []
    sources: list[str] = []
    for layer_name, file, trusted in ((LAYER_SITE, site_file, ()), (LAYER_USER, user_file, _uids(user_uid))):
        if file is None:
            continue
        layers.append(read_layer(file, layer=layer_name, diags=diags, trusted_uids=trusted))
        sources.append(f"{layer_name}:{file}")
    layers.append(layer_from_cli(cli, cli_flags, diags))

    site = layers[0] if layers and layers[0].name == LAYER_SITE else Layer(LAYER_SITE)
    effective: dict[str, tuple[Any, Loc]] = {p: (v, DEFAULT_LOC) for p, v in defaults().items()}
    for layer in layers:
        for path, (value, loc) in layer.values.items():
            lock = _lock_for(path, site)
            if layer.name != LAYER_SITE and lock is not None:
                where = layer.key_locs[path]
                todo = "remove the flag" if layer.name == LAYER_CLI else "remove it from your policy"
                diags.append(Diagnostic(where, f"{path} is locked by the site policy ({lock}); {todo}"))
                continue
            effective[path] = (value, loc)

    _apply_bounds(effective, site, diags)
    _cross_checks(effective, diags)
    if diags:
        raise PolicyInvalidError(sorted(diags, key=_report_order))
    pol = _assemble(effective, site, sources)
    hlog.event(_log, "policy.loaded", "policy loaded", logging.DEBUG, digest=pol.digest(), sources=list(sources))
    return pol


_LAYER_ORDER = {LAYER_DEFAULT: 0, LAYER_SITE: 1, LAYER_USER: 2, LAYER_CLI: 3}


def _report_order(diag: Diagnostic) -> tuple[int, int, int]:
    """Site file, user file, then flags; top to bottom within a file."""
    return (_LAYER_ORDER.get(diag.loc.layer, 0), diag.loc.line, diag.loc.col)


def _uids(uid: int | None) -> Collection[int]:
    return () if uid is None else (uid,)


def read_layer(
    path: Path, *, layer: str, diags: list[Diagnostic], trusted_uids: Collection[int] = ()
) -> Layer:
    """One policy file as a layer; problems go to ``diags``, unreadable files raise PolicyError."""
    text = read_policy_text(path, layer=layer, trusted_uids=trusted_uids)
    tree, problems = parse_yaml(text, file=str(path), layer=layer)
    diags.extend(problems)
    if tree is None:
        return Layer(layer, str(path))
    return layer_from_tree(tree, layer=layer, file=str(path), diags=diags)


def _lock_for(path: str, site: Layer) -> Loc | None:
    for lock, loc in site.locks.items():
        if path == lock or path.startswith(lock + "."):
            return loc
    return None


def _apply_bounds(effective: dict[str, tuple[Any, Loc]], site: Layer, diags: list[Diagnostic]) -> None:
    """Hold each bounded key within the site's limits.

    A built-in default outside the limits is moved to the nearest limit (the
    site asked for it); a value someone wrote outside them is an error, since
    silently changing it would hide the conflict from its author.
    """
    for path, bound in site.bounds.items():
        value, loc = effective[path]
        kind = FIELDS[path].kind
        if value == "auto":
            continue  # choose_interval clamps the chosen interval to the bounds
        lo, hi = bound.minimum, bound.maximum
        if value is None:
            if hi is None:
                continue
            if loc.layer == LAYER_DEFAULT:
                effective[path] = (hi, bound.loc)
            else:
                diags.append(Diagnostic(loc, f"{path}: null (no limit) is above the site maximum "
                                             f"{kind.show(hi)} ({bound.loc})"))
            continue
        if lo is not None and value < lo:
            target, word = lo, "below the site minimum"
        elif hi is not None and value > hi:
            target, word = hi, "above the site maximum"
        else:
            continue
        if loc.layer == LAYER_DEFAULT:
            effective[path] = (target, bound.loc)
        else:
            diags.append(Diagnostic(loc, f"{path}: {kind.show(value)} is {word} {kind.show(target)} "
                                         f"({bound.loc})"))


def _explicit(*entries: tuple[Any, Loc]) -> Loc:
    """Where to report a conflict between keys: the one set by the latest layer."""
    return max((loc for _, loc in entries), key=lambda loc: _LAYER_ORDER.get(loc.layer, 0))


def _cross_checks(effective: dict[str, tuple[Any, Loc]], diags: list[Diagnostic]) -> None:
    codec = effective["storage.compression.codec"]
    level = effective["storage.compression.level"]
    if codec[0] in CODEC_LEVELS:
        lo, hi = CODEC_LEVELS[codec[0]]
        if not lo <= level[0] <= hi:
            loc = level[1] if level[1].layer != LAYER_DEFAULT else codec[1]
            diags.append(Diagnostic(loc, f"storage.compression.level: expected an integer from {lo} to {hi} "
                                         f"for codec '{codec[0]}', got {level[0]}"))
    margin = effective["preemption.grace_margin"]
    grace = effective["preemption.grace_time"]
    if margin[0] >= grace[0]:
        diags.append(Diagnostic(_explicit(margin, grace), f"preemption.grace_margin ({margin[0]}s) must be "
                                f"less than preemption.grace_time ({grace[0]}s), or no time is left to "
                                "checkpoint"))
    imin = effective["site.interval_min"]
    imax = effective["site.interval_max"]
    if imin[0] > imax[0]:
        diags.append(Diagnostic(_explicit(imin, imax), f"site.interval_min ({imin[0]}s) is above "
                                f"site.interval_max ({imax[0]}s)"))
    interval = effective["interval"]
    if interval[0] == "auto" and effective["site.mtbf"][0] is None:
        diags.append(Diagnostic(interval[1], "interval: 'auto' needs site.mtbf (the mean time between "
                                "failures) in the site policy; ask your site to set it, or give a fixed "
                                "interval such as 1h"))


def _assemble(effective: dict[str, tuple[Any, Loc]], site: Layer, sources: list[str]) -> Policy:
    tree: dict[str, Any] = {}
    for path, (value, _) in effective.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def build(section: str, data: dict[str, Any]) -> dict[str, Any]:
        kwargs = {}
        for key, val in data.items():
            sub = f"{section}.{key}" if section else key
            kwargs[key] = SECTION_CLASSES[sub](**build(sub, val)) if sub in SECTION_CLASSES else val
        return kwargs

    return Policy(
        **build("", tree),
        origins={path: loc.origin() for path, (_, loc) in effective.items()},
        locks=tuple(site.locks),
        bounds={path: Bound(b.minimum, b.maximum, b.loc.origin()) for path, b in site.bounds.items()},
        sources=tuple(sources),
    )
