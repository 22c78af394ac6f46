"""One layer of policy (site file, user file or command-line flags), checked key by key.

A layer is the set of keys one source sets, each with its checked value and
where it was written, plus, for the site layer, its locks and bounds. Merging
the layers and enforcing locks and bounds is :mod:`hpcckpt.policy.loader`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hpcckpt.errors import UsageError
from hpcckpt.policy.diagnostics import LAYER_CLI, LAYER_SITE, Diagnostic, Loc, did_you_mean, show_value
from hpcckpt.policy.kinds import Invalid
from hpcckpt.policy.schema import FIELDS, SECTIONS, SITE_META_KEYS, Field, children
from hpcckpt.policy.source import MAP, SCALAR, SEQ, YNode


@dataclass
class BoundSpec:
    minimum: Any
    maximum: Any
    loc: Loc


@dataclass
class Layer:
    name: str  # LAYER_SITE, LAYER_USER or LAYER_CLI
    file: str | None = None
    values: dict[str, tuple[Any, Loc]] = field(default_factory=dict)  # path -> (value, where the value is)
    key_locs: dict[str, Loc] = field(default_factory=dict)  # path -> where the key is
    locks: dict[str, Loc] = field(default_factory=dict)
    bounds: dict[str, BoundSpec] = field(default_factory=dict)


def _join(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def unknown_key_message(path: str) -> str:
    """'unknown key ...' with the likeliest intended key: a sibling typo, or a key put in the wrong section."""
    section, _, name = path.rpartition(".")
    siblings = [_join(section, c) for c in children(section)] if (not section or section in SECTIONS) else []
    hint = did_you_mean(path, siblings)
    if not hint:
        elsewhere = [p for p in [*FIELDS, *SECTIONS] if p.rpartition(".")[2] == name]
        # A right key in the wrong section ("keep_last" at the top level) beats a fuzzy match.
        hint = f" (did you mean '{elsewhere[0]}'?)" if elsewhere else did_you_mean(path, [*FIELDS, *SECTIONS])
    return f"unknown key '{path}'{hint}"


def _check_value(fld: Field, raw: Any, *, from_text: bool, layer: str) -> Any:
    value = fld.kind.check(raw, from_text=from_text)
    if layer != LAYER_SITE and fld.user_check is not None:
        fld.user_check(value)
    return value


def _invalid_text(path: str, err: Invalid) -> str:
    if not err.expected:  # a user_check refusal: the suffix says it all
        return f"{path}: {err.suffix}"
    return f"{path}: {err.text()}"


def _item_loc(node: YNode, got: Any) -> Loc:
    """Point at the list item that was refused, not at the list."""
    if node.kind == SEQ:
        for item in node.items:
            if item.kind == SCALAR and item.value == got and type(item.value) is type(got):
                return item.loc
    return node.loc


def layer_from_tree(tree: YNode, *, layer: str, file: str, diags: list[Diagnostic]) -> Layer:
    out = Layer(layer, file)
    if tree.kind != MAP:
        diags.append(Diagnostic(tree.loc, f"expected a mapping of policy keys at the top level, got "
                                          f"{show_value(tree.plain())}"))
        return out
    for key, kloc, vnode in tree.entries:
        if key in SITE_META_KEYS:
            if layer != LAYER_SITE:
                diags.append(Diagnostic(kloc, f"'{key}' can only be set in the site policy"))
            elif key == "locks":
                _parse_locks(vnode, out, diags)
            else:
                _parse_bounds(vnode, "", out, diags)
            continue
        _walk(vnode, key, kloc, out, diags)
    return out


def _walk(node: YNode, path: str, kloc: Loc, out: Layer, diags: list[Diagnostic]) -> None:
    fld = FIELDS.get(path)
    if fld is not None:
        if node.has_broken():
            return
        if fld.site_only and out.name != LAYER_SITE:
            diags.append(Diagnostic(kloc, f"{path} can only be set in the site policy"))
            return
        try:
            value = _check_value(fld, node.plain(), from_text=False, layer=out.name)
        except Invalid as err:
            diags.append(Diagnostic(_item_loc(node, err.got), _invalid_text(path, err)))
            return
        out.values[path] = (value, node.loc)
        out.key_locs[path] = kloc
        return
    if path in SECTIONS:
        if node.kind == MAP:
            for key, sub_kloc, sub in node.entries:
                _walk(sub, _join(path, key), sub_kloc, out, diags)
        elif not (node.kind == SCALAR and node.value is None):  # "storage:" with every key commented out
            diags.append(Diagnostic(node.loc, f"{path}: expected a section with keys "
                                              f"{', '.join(children(path))}, got {show_value(node.plain())}"))
        return
    diags.append(Diagnostic(kloc, unknown_key_message(path)))


def _parse_locks(node: YNode, out: Layer, diags: list[Diagnostic]) -> None:
    if node.kind == SCALAR and node.value is None:
        return
    if node.kind != SEQ:
        diags.append(Diagnostic(node.loc, f"locks: expected a list of keys such as [storage.root], "
                                          f"got {show_value(node.plain())}"))
        return
    for item in node.items:
        name = item.value if item.kind == SCALAR else None
        if not isinstance(name, str):
            diags.append(Diagnostic(item.loc, f"locks: expected a key such as storage.root, "
                                              f"got {show_value(item.plain())}"))
        elif name not in FIELDS and name not in SECTIONS:
            diags.append(Diagnostic(item.loc, "locks: " + unknown_key_message(name)))
        else:
            out.locks[name] = item.loc


def _parse_bounds(node: YNode, section: str, out: Layer, diags: list[Diagnostic]) -> None:
    if node.kind == SCALAR and node.value is None:
        return
    if node.kind != MAP:
        diags.append(Diagnostic(node.loc, f"bounds: expected a mapping such as {{interval: {{min: 5m}}}}, "
                                          f"got {show_value(node.plain())}"))
        return
    for key, kloc, sub in node.entries:
        path = _join(section, key)
        fld = FIELDS.get(path)
        if fld is None:
            if path in SECTIONS:
                _parse_bounds(sub, path, out, diags)
            else:
                diags.append(Diagnostic(kloc, "bounds: " + unknown_key_message(path)))
            continue
        if not fld.kind.numeric:
            diags.append(Diagnostic(kloc, f"bounds: {path} is not a number, duration or size and cannot "
                                          f"be bounded; lock it instead (locks: [{path}])"))
            continue
        _parse_one_bound(fld, sub, kloc, out, diags)


def _parse_one_bound(fld: Field, node: YNode, kloc: Loc, out: Layer, diags: list[Diagnostic]) -> None:
    path = fld.path
    if node.kind != MAP or not node.entries:
        diags.append(Diagnostic(node.loc, f"bounds.{path}: expected a mapping with min and/or max, "
                                          f"got {show_value(node.plain())}"))
        return
    limits: dict[str, Any] = {}
    for key, lkloc, lnode in node.entries:
        if key not in ("min", "max"):
            diags.append(Diagnostic(lkloc, f"bounds.{path}: unknown key '{key}'"
                                           f"{did_you_mean(key, ['min', 'max'])}"))
            continue
        try:
            value = fld.kind.parse(lnode.plain(), from_text=False) if lnode.value is not None else None
        except Invalid as err:
            diags.append(Diagnostic(lnode.loc, f"bounds.{path}.{key}: {err.text()}"))
            continue
        if value is None or value == "auto":
            diags.append(Diagnostic(lnode.loc, f"bounds.{path}.{key}: expected {fld.kind.expected}, "
                                               f"got {show_value(lnode.plain())}"))
            continue
        limits[key] = value
    lo, hi = limits.get("min"), limits.get("max")
    if lo is not None and hi is not None and lo > hi:
        diags.append(Diagnostic(node.loc, f"bounds.{path}: min {fld.kind.show(lo)} is above "
                                          f"max {fld.kind.show(hi)}"))
        return
    if limits:
        out.bounds[path] = BoundSpec(lo, hi, kloc)


def default_flag(path: str) -> str:
    """The flag name a command-line override is reported under, unless the caller names it."""
    return f"--{path.replace('_', '-')}" if "." not in path else f"--set {path}"


def layer_from_cli(
    overrides: Mapping[str, Any], flags: Mapping[str, str] | None, diags: list[Diagnostic]
) -> Layer:
    out = Layer(LAYER_CLI)
    for path, raw in overrides.items():
        flag = (flags or {}).get(path) or default_flag(path)
        loc = Loc(LAYER_CLI, flag=flag)
        fld = FIELDS.get(path)
        if fld is None:
            diags.append(Diagnostic(loc, unknown_key_message(path)))
            continue
        if fld.site_only:
            diags.append(Diagnostic(loc, f"{path} can only be set in the site policy"))
            continue
        try:
            value = _check_value(fld, raw, from_text=True, layer=LAYER_CLI)
        except Invalid as err:
            diags.append(Diagnostic(loc, _invalid_text(path, err)))
            continue
        out.values[path] = (value, loc)
        out.key_locs[path] = loc
    return out


def parse_set_options(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` arguments as an override mapping for :func:`load_policy`'s ``cli``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item}: expected KEY=VALUE, such as --set retention.keep_last=5")
        out[key.strip()] = value
    return out
