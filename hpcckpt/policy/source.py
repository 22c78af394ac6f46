"""Reading a policy file into a tree that remembers where every key and value is.

PyYAML's composer gives nodes with start marks; we keep those marks on our own
small tree (:class:`YNode`), so that validation can name ``file:line:col`` for
any key or value. Scalars are constructed with PyYAML's safe constructor, so
``true``, ``3``, ``1.5`` and ``null`` mean what YAML says. Duplicate keys, which
PyYAML silently resolves to the last one, are errors here: in a policy file a
duplicate is almost always a mistake whose effect the author did not see.

Policy files may be read by code running as root (Slurm prolog and epilog), so
:func:`read_policy_text` does not follow symbolic links that someone other
than root planted, accepts only regular files of bounded size and, as root,
only files owned by a trusted uid.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from hpcckpt.errors import PolicyError
from hpcckpt.inputs import NotRegularFileError, open_regular
from hpcckpt.policy.diagnostics import Diagnostic, Loc

MAX_POLICY_BYTES = 1 << 20  # far above any sane policy; stops a huge or endless file early
# A policy is a few dozen keys three levels deep. These bounds are far above that, and far below what
# would exhaust Python's stack (the composer recurses per level) or memory (aliases share nodes, so a
# "billion laughs" file of a few lines stands for 10**9 values once expanded).
MAX_DEPTH = 64  # nested sequences and mappings
MAX_NODES = 100_000  # values, counted as expanded: each alias counts the whole node it repeats
MAX_ALIASES = 1_000  # uses of an alias (*name)

SCALAR = "scalar"
SEQ = "seq"
MAP = "map"


@dataclass
class YNode:
    kind: str  # SCALAR, SEQ or MAP
    loc: Loc
    value: Any = None  # the Python value, for scalars
    items: list[YNode] = field(default_factory=list)  # for sequences
    entries: list[tuple[str, Loc, YNode]] = field(default_factory=list)  # for mappings: key, key loc, value
    broken: bool = False  # a scalar YAML could not construct; already reported

    def has_broken(self) -> bool:
        return self.broken or any(n.has_broken() for n in self.items) or any(
            n.has_broken() for _, _, n in self.entries
        )

    def get(self, key: str) -> tuple[Loc, YNode] | None:
        for name, kloc, node in self.entries:
            if name == key:
                return kloc, node
        return None

    def plain(self) -> Any:
        """The node as plain Python data (lists, dicts, scalars)."""
        if self.kind == SCALAR:
            return self.value
        if self.kind == SEQ:
            return [n.plain() for n in self.items]
        return {k: n.plain() for k, _, n in self.entries}


def read_policy_text(path: Path, *, layer: str, trusted_uids: Collection[int] | None = None) -> str:
    """The text of a policy file, read without trusting anything about the path.

    ``trusted_uids`` applies only when running as root: the file must be owned by
    one of them (root is always trusted).
    """
    as_root = os.geteuid() == 0
    target = _resolve_root_owned_links(path) if as_root else path
    try:
        fd = open_regular(target, follow_symlinks=not as_root)  # a FIFO must not hang a prolog
    except NotRegularFileError as err:
        raise PolicyError(f"{path}: {layer} policy is {err.kind}, not a regular file",
                          hint="point at a YAML file") from err
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PolicyError(
                f"{path}: is a symbolic link not owned by root; policy files read as root must be "
                "regular files or root-owned links",
                hint="point at the file itself",
            ) from err
        raise PolicyError(
            f"{path}: cannot read {layer} policy: {err.strerror}",
            hint="check the path (--policy, $HPCCKPT_POLICY, $HPCCKPT_SITE_POLICY)",
        ) from err
    try:
        st = os.fstat(fd)
        if as_root:
            trusted = {0, *(trusted_uids or ())}
            if st.st_uid not in trusted:
                raise PolicyError(
                    f"{path}: {layer} policy is owned by uid {st.st_uid}, which is not trusted here "
                    f"(running as root; trusted: {', '.join(map(str, sorted(trusted)))})",
                    hint="a policy read as root must belong to root or to the job's user",
                )
            if layer == "site" and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise PolicyError(
                    f"{path}: site policy is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                    hint=f"chmod go-w {path}",
                )
        if st.st_size > MAX_POLICY_BYTES:
            raise PolicyError(f"{path}: {layer} policy is {st.st_size} bytes; the limit is {MAX_POLICY_BYTES}")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(MAX_POLICY_BYTES + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}: {layer} policy is larger than {MAX_POLICY_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PolicyError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start})", hint="save the policy as UTF-8"
        ) from err


def _resolve_root_owned_links(path: Path) -> Path:
    """Follow a final-component symlink only while the link itself belongs to root.

    Config management often installs /etc files as links; those are root's. A
    link owned by anyone else is left in place, so O_NOFOLLOW refuses it.
    """
    current = path
    for _ in range(8):
        try:
            st = os.lstat(current)
        except OSError:
            return current
        if not stat.S_ISLNK(st.st_mode) or st.st_uid != 0:
            return current
        nxt = Path(os.readlink(current))
        current = nxt if nxt.is_absolute() else current.parent / nxt
    return current


def parse_yaml(text: str, *, file: str, layer: str) -> tuple[YNode | None, list[Diagnostic]]:
    """The tree of ``text`` and every structural problem (syntax, duplicate keys, odd keys).

    A syntax error stops parsing, so it is reported alone; other problems are
    all collected. An empty document gives an empty mapping.
    """
    try:
        loader = BoundedLoader(text)  # refuses control characters at once
    except yaml.reader.ReaderError as err:
        return None, [_reader_diagnostic(err, text, file, layer)]
    try:
        try:
            root = loader.get_single_node()
        except yaml.reader.ReaderError as err:
            return None, [_reader_diagnostic(err, text, file, layer)]
        except yaml.MarkedYAMLError as err:
            return None, [_syntax_diagnostic(err, file, layer)]
        except yaml.YAMLError as err:  # unmarked: only "expected a single document" and the like
            return None, [Diagnostic(Loc(layer, file, 1, 1), f"invalid YAML: {err}")]
        if root is None:
            return YNode(MAP, Loc(layer, file, 1, 1)), []
        diags: list[Diagnostic] = []
        tree = _convert(loader, root, file, layer, diags)
        return tree, diags
    finally:
        loader.dispose()


class BoundedLoader(yaml.SafeLoader):
    """A safe loader whose composer refuses deep nesting, recursive aliases and alias bombs.

    The checks run while the node graph is being built, before anything
    expands it, so an input that breaks a bound costs no more than reading
    up to that point; the error is a composer error with the offending mark.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0  # expanded size of everything composed so far
        self._aliases = 0
        self._open_anchors: set[str] = set()  # anchors of collections still being composed
        self._anchor_sizes: dict[str, int] = {}  # anchor -> expanded size of its node

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._use_alias(event)
            return cast(yaml.Node, super().compose_node(parent, index))
        collection = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        anchor = event.anchor
        before = self._nodes
        self._count(1, event)
        if collection:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _composer_error(f"nested more than {MAX_DEPTH} levels deep; a policy needs a handful", event)
            if anchor is not None:
                self._open_anchors.add(anchor)
        try:
            node = cast(yaml.Node, super().compose_node(parent, index))
        finally:
            if collection:
                self._depth -= 1
                self._open_anchors.discard(anchor or "")
        if anchor is not None:
            self._anchor_sizes[anchor] = self._nodes - before
        return node

    def _use_alias(self, event: yaml.AliasEvent) -> None:
        anchor = event.anchor or ""
        if anchor in self._open_anchors:
            raise _composer_error(f"alias *{anchor} is used inside the node &{anchor} it names (a recursive alias)",
                                  event)
        self._aliases += 1
        if self._aliases > MAX_ALIASES:
            raise _composer_error(f"more than {MAX_ALIASES} aliases", event)
        # An undefined alias counts 1 here; the composer then reports it as undefined.
        self._count(self._anchor_sizes.get(anchor, 1), event)

    def _count(self, size: int, event: yaml.Event) -> None:
        self._nodes += size
        if self._nodes > MAX_NODES:
            raise _composer_error(f"more than {MAX_NODES} values once aliases are expanded "
                                  "(an alias repeats the whole node it names)", event)


def _composer_error(problem: str, event: yaml.Event) -> yaml.composer.ComposerError:
    """An error at ``event``, which parse_yaml turns into a diagnostic naming file, line and column."""
    return yaml.composer.ComposerError(None, None, problem, cast(yaml.error.Mark, event.start_mark))


def _mark_loc(mark: Any, file: str, layer: str) -> Loc:
    return Loc(layer, file, mark.line + 1, mark.column + 1)


def _reader_diagnostic(err: yaml.reader.ReaderError, text: str, file: str, layer: str) -> Diagnostic:
    """A character YAML does not allow (a control character, say), at its line and column."""
    pos = max(0, min(int(err.position), len(text)))
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    char = err.character if isinstance(err.character, int) else ord(str(err.character)[:1] or "\0")
    return Diagnostic(Loc(layer, file, line, col), f"invalid YAML: character U+{char:04X} is not allowed "
                                                   f"({err.reason}); remove it")


def _syntax_diagnostic(err: yaml.MarkedYAMLError, file: str, layer: str) -> Diagnostic:
    mark = err.problem_mark or err.context_mark
    loc = _mark_loc(mark, file, layer) if mark is not None else Loc(layer, file, 1, 1)
    problem = err.problem or "syntax error"
    text = f"invalid YAML: {problem}"
    if err.context and err.context_mark is not None and err.context_mark is not mark:
        text += f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
    # No source snippet: the file may be one root was tricked into reading.
    return Diagnostic(loc, text)


def _convert(loader: yaml.SafeLoader, node: yaml.Node, file: str, layer: str, diags: list[Diagnostic]) -> YNode:
    loc = _mark_loc(node.start_mark, file, layer)
    if isinstance(node, yaml.ScalarNode):
        try:
            value = loader.construct_object(node, deep=True)
        except yaml.YAMLError as err:
            diags.append(Diagnostic(loc, f"cannot use this YAML value: {getattr(err, 'problem', err)}"))
            return YNode(SCALAR, loc, broken=True)
        return YNode(SCALAR, loc, value=value)
    if isinstance(node, yaml.SequenceNode):
        return YNode(SEQ, loc, items=[_convert(loader, n, file, layer, diags) for n in node.value])
    assert isinstance(node, yaml.MappingNode)
    out = YNode(MAP, loc)
    seen: dict[str, Loc] = {}
    for knode, vnode in node.value:
        kloc = _mark_loc(knode.start_mark, file, layer)
        if knode.tag == "tag:yaml.org,2002:merge":
            diags.append(Diagnostic(kloc, "YAML merge keys ('<<') are not supported in policy files; "
                                          "write the keys out"))
            continue
        if not isinstance(knode, yaml.ScalarNode):
            diags.append(Diagnostic(kloc, "a key must be a plain name, not a list or mapping"))
            continue
        key = knode.value  # the key as written: "1" stays "1", so odd keys show as typed
        if key in seen:
            first = seen[key]
            diags.append(Diagnostic(kloc, f"duplicate key '{key}' (first at line {first.line}); remove one"))
            continue
        seen[key] = kloc
        out.entries.append((key, kloc, _convert(loader, vnode, file, layer, diags)))
    return out
