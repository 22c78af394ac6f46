"""The checkpoint catalog: which images exist, which is each job's latest valid one.

``open_catalog(None, root, user)`` gives the per-user SQLite catalog at
``ROOT/USER/catalog.sqlite``; a ``postgresql://`` URL gives the site's
PostgreSQL catalog; any other string is taken as a SQLite file path.
"""

from __future__ import annotations

from pathlib import Path

from hpcckpt.catalog.base import Catalog
from hpcckpt.catalog.model import CkptRecord, Status
from hpcckpt.context import User
from hpcckpt.errors import StoreError
from hpcckpt.fs.layout import CATALOG_FILE, StoreLayout
from hpcckpt.fs.safe import ensure_private_dir, is_safe_component

__all__ = ["CATALOG_FILE", "Catalog", "CkptRecord", "Status", "is_postgres_url", "open_catalog", "sqlite_path"]


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("postgresql://", "postgres://"))


def sqlite_path(store_root: Path, user: User) -> Path:
    if not is_safe_component(user.name):
        raise StoreError(f"user name {user.name!r} cannot be a directory name")
    return StoreLayout(Path(store_root)).catalog_file(user)


def open_catalog(url: str | None, store_root: Path, user: User) -> Catalog:
    """Open (creating and migrating as needed) the catalog that ``user`` acts through."""
    if is_postgres_url(url):
        from hpcckpt.catalog.postgres import PostgresCatalog

        return PostgresCatalog(str(url), user)
    from hpcckpt.catalog.sqlite import SqliteCatalog

    if url:
        return SqliteCatalog(Path(url), user)
    path = sqlite_path(store_root, user)
    ensure_private_dir(path.parent, user.uid, user.gid, base=Path(store_root))
    return SqliteCatalog(path, user)
