"""Which users' catalogs and stores a command acts on, resolved once for the CLI and hooks.

A user acts on their own checkpoints only. Root acts on one user's
(``--user NAME``) or, by default, on every user who has a directory in the
store: with SQLite that means one catalog file per user; with PostgreSQL one
shared catalog, where the server's row-level security decides what a role sees.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcckpt.catalog import Catalog, is_postgres_url, open_catalog, sqlite_path
from hpcckpt.context import User, resolve_catalog_url, resolve_store_root, user_by_name
from hpcckpt.errors import NotFoundError, PermissionDeniedError, StoreError
from hpcckpt.store.retention import RetentionRules
from hpcckpt.store.images import Store


@dataclass(frozen=True)
class Setup:
    store_root: Path
    catalog_url: str | None
    retention: RetentionRules


def load_setup(
    store: str | None,
    catalog: str | None,
    policy_file: str | None,
    *,
    policy_cli: Mapping[str, Any] | None = None,
    policy_cli_flags: Mapping[str, str] | None = None,
) -> Setup:
    """Store root, catalog URL and retention from flags, environment and policy, in that order."""
    from hpcckpt.policy import load_policy

    pol = load_policy(
        user_file=Path(policy_file) if policy_file else None, cli=policy_cli, cli_flags=policy_cli_flags
    )
    return Setup(
        store_root=resolve_store_root(store, pol.storage.root),
        catalog_url=resolve_catalog_url(catalog, pol.storage.catalog),
        retention=RetentionRules.from_policy(pol),
    )


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


@contextmanager
def opened(setup: Setup, user: User) -> Iterator[tuple[Catalog, Store]]:
    """The catalog and store ``user`` acts through, closed afterwards."""
    cat = open_catalog(setup.catalog_url, setup.store_root, user)
    try:
        yield cat, Store(setup.store_root, user)
    finally:
        cat.close()


def has_catalog(setup: Setup, user: User) -> bool:
    """False when ``user`` has no per-user catalog yet: read-only commands then create nothing."""
    if setup.catalog_url:
        return True
    return os.path.lexists(sqlite_path(setup.store_root, user))


def shared_catalog(setup: Setup) -> bool:
    """One catalog for every user (PostgreSQL), rather than a file per user."""
    return is_postgres_url(setup.catalog_url) or bool(setup.catalog_url)
