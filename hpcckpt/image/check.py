"""Verifying several images and ranking the outcomes (``hpcckpt verify``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hpcckpt.context import User
from hpcckpt.errors import (
    EXIT_CORRUPT,
    EXIT_OK,
    EXIT_UNREADABLE,
    HpcckptError,
    UnreadableImageError,
)
from hpcckpt.image.reader import verify_image
from hpcckpt.image.resolve import Lookup, catalog_lookup, parent_resolver, resolve_image


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank(code: int) -> int:
    # Corruption is the news that matters most (a checkpoint is lost), then
    # unreadable (maybe transient), then anything else (not found, permission).
    return {EXIT_CORRUPT: 3, EXIT_UNREADABLE: 2}.get(code, 1 if code else 0)


def check_one(arg: str, user: User, lookup: Lookup | None) -> CheckResult:
    path = ""
    try:
        p = resolve_image(arg, user, lookup)
        path = str(p)
        s = verify_image(p, parent_resolver(user, lookup))
    except UnreadableImageError as exc:
        return CheckResult(arg, path, "unreadable", exc.exit_code, exc.render())
    except HpcckptError as exc:
        status = "corrupt" if exc.exit_code == EXIT_CORRUPT else "error"
        return CheckResult(arg, path, status, exc.exit_code, exc.render())
    if s.errors:
        return CheckResult(arg, path, "failed_checkpoint", EXIT_CORRUPT,
                           "the image records a failed checkpoint: " + s.errors[0], s.meta.ckptid, 0,
                           s.length, s.digest)
    return CheckResult(arg, path, "ok", EXIT_OK, "", s.meta.ckptid, len(s.sections), s.length, s.digest,
                       s.parents)


def check_images(
    args: Sequence[str], user: User, store: str | None = None, catalog: str | None = None,
    policy: str | None = None,
) -> tuple[list[CheckResult], int]:
    """Results in argument order, and the exit code of the worst one."""
    lookup = catalog_lookup(user, store, catalog, policy)
    results = [check_one(a, user, lookup) for a in args]
    worst = max(results, key=lambda r: _rank(r.exit_code))
    return results, worst.exit_code
