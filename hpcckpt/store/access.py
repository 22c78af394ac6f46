"""Which users' catalogs and stores a command acts on, resolved once for the CLI and hooks.

A user acts on their own checkpoints only. Root acts on one user's
(``--user NAME``) or, by default, on every user who has a directory in the
store: with SQLite that means one catalog file per user; with PostgreSQL one
shared catalog, where the server's row-level security decides what a role sees.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hpcckpt.context import User, user_by_name
from hpcckpt.errors import NotFoundError, PermissionDeniedError, StoreError
from hpcckpt.store.site import Site


def target_users(store_root: Path, acting: User, user_name: str | None) -> list[User]:
    """The users a command acts for."""
    if user_name is not None and user_name != acting.name:
        if not acting.is_root:
            raise PermissionDeniedError(
                f"only root may act on another user's checkpoints ({user_name})",
                hint="drop --user to act on your own",
            )
        try:
            return [user_by_name(user_name)]
        except KeyError as exc:
            raise NotFoundError(f"no such user: {user_name}") from exc
    if user_name is not None or not acting.is_root:
        return [acting]
    users: list[User] = []
    try:
        names = sorted(os.listdir(store_root))
    except FileNotFoundError:
        return users
    except OSError as exc:
        raise StoreError(f"{store_root}: cannot list the store: {exc.strerror}") from exc
    for name in names:
        try:
            st = os.lstat(store_root / name)
            user = user_by_name(name)
        except (OSError, KeyError):
            continue  # not a user's directory
        if stat.S_ISDIR(st.st_mode) and st.st_uid == user.uid:
            users.append(user)
    return users


def has_catalog(site: Site, user: User) -> bool:
    """False when ``user`` has no per-user catalog yet: read-only commands then create nothing."""
    if site.shared_catalog:
        return True
    return os.path.lexists(site.layout.catalog_file(user))
