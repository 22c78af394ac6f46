"""Verifying several images and ranking the outcomes (``hpcckpt verify``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hpcckpt.context import User
from hpcckpt.errors import HpcckptError
from hpcckpt.exitcodes import EXIT_CORRUPT, EXIT_OK, EXIT_UNREADABLE
from hpcckpt.image.errors import UnreadableImageError
from hpcckpt.image.reader import verify_image
from hpcckpt.store.binding import check_bound
from hpcckpt.store.resolve import Lookup, catalog_lookup, parent_resolver, resolve_image


@dataclass
class CheckResult:
    arg: str
    path: str
    status: str  # "ok" | "corrupt" | "failed_checkpoint" | "unreadable" | "error"
    exit_code: int
    error: str = ""
    ckptid: int | None = None
    sections: int = 0
    length: int = 0
    digest: str = ""
    parents: list[int] = field(default_factory=list)  # images of the chain verified with it
    marked: bool = False  # this check marked the checkpoint's catalog row corrupt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank(code: int) -> int:
    # Corruption is the news that matters most (a checkpoint is lost), then
    # unreadable (maybe transient), then anything else (not found, permission).
    return {EXIT_CORRUPT: 3, EXIT_UNREADABLE: 2}.get(code, 1 if code else 0)


def _own_path(exc: HpcckptError, path: str) -> bool:
    """Whether an image error is about the image at ``path`` itself (not one of its parents)."""
    where = getattr(exc, "path", None)
    return where is None or str(where) == path


def check_one(arg: str, user: User, lookup: Lookup | None) -> CheckResult:
    path = ""
    # A checkpoint id (not a path) names a catalog row: the image must be that checkpoint, and a
    # damaged one is marked corrupt there, so that list and resume stop offering it.
    row = None
    try:
        p = resolve_image(arg, user, lookup)
        if lookup is not None and arg.isdigit() and not os.path.lexists(arg):
            row = lookup(int(arg))
        path = str(p)
        s = verify_image(p, parent_resolver(user, lookup))
        if row is not None:
            check_bound(s.meta, row, path)
    except UnreadableImageError as exc:
        return CheckResult(arg, path, "unreadable", exc.exit_code, exc.render())
    except HpcckptError as exc:
        status = "corrupt" if exc.exit_code == EXIT_CORRUPT else "error"
        res = CheckResult(arg, path, status, exc.exit_code, exc.render())
        if status == "corrupt" and row is not None and path and _own_path(exc, path):
            res.marked = _mark(lookup, row.ckptid, str(exc))
        return res
    if s.errors:
        return CheckResult(arg, path, "failed_checkpoint", EXIT_CORRUPT,
                           "the image records a failed checkpoint: " + s.errors[0], s.meta.ckptid, 0,
                           s.length, s.digest)
    return CheckResult(arg, path, "ok", EXIT_OK, "", s.meta.ckptid, len(s.sections), s.length, s.digest,
                       s.parents)


def _mark(lookup: Lookup | None, ckptid: int, reason: str) -> bool:
    mark = getattr(lookup, "mark_corrupt", None)
    if mark is None:
        return False
    try:
        return bool(mark(ckptid, reason))
    except HpcckptError:
        return False  # verify still reports the image; the row is left as it was (read-only catalog)


def check_images(
    args: Sequence[str], user: User, store: str | None = None, catalog: str | None = None,
    policy: str | None = None,
) -> tuple[list[CheckResult], int]:
    """Results in argument order, and the exit code of the worst one."""
    lookup = catalog_lookup(user, store, catalog, policy)
    results = [check_one(a, user, lookup) for a in args]
    worst = max(results, key=lambda r: _rank(r.exit_code))
    return results, worst.exit_code
