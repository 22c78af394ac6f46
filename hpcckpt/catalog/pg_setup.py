"""``hpcckpt catalog setup``: make a PostgreSQL catalog ready for per-user access (tables, RLS, user mappings).

Apart from :mod:`hpcckpt.catalog.pg_security` (the SQL of the security
model) because it drives a whole :class:`PostgresCatalog`, which itself
uses that SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hpcckpt.catalog.pg_security import (
    ADMIN_ROLE,
    MAP_TABLE,
    add_user,
    apply_rls,
    check_role_name,
    hba_config,
    quote_ident,
    remove_user,
    user_map,
)
from hpcckpt.catalog.postgres import PostgresCatalog
from hpcckpt.context import User
from hpcckpt.errors import CatalogError, UsageError


@dataclass
class SetupReport:
    """What :func:`setup_catalog` found and did."""

    location: str
    database: str
    role: str
    schema_version: int
    migrated_from: int | None
    added: list[tuple[str, int]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    users: list[tuple[str, int]] = field(default_factory=list)
    hba: str = ""
    ident: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "database": self.database,
            "role": self.role,
            "schema_version": self.schema_version,
            "migrated_from": self.migrated_from,
            "rls": True,
            "added": [{"user": n, "uid": u} for n, u in self.added],
            "removed": list(self.removed),
            "users": [{"user": n, "uid": u} for n, u in self.users],
            "pg_hba": self.hba,
            "pg_ident": self.ident,
        }


def setup_catalog(url: str, acting: User, *, add: Sequence[tuple[str, int]] = (), remove: Sequence[str] = (),
                  extra_admins: Sequence[str] = ()) -> SetupReport:
    """Make the PostgreSQL catalog at ``url`` ready for per-user access; idempotent.

    Connects as the admin role (root's default, see
    :func:`hpcckpt.catalog.postgres.session_role`), creates or migrates the
    tables, applies row-level security, removes then adds user mappings, and
    returns what the server's pg_hba.conf and pg_ident.conf need.
    """
    import psycopg

    clash = sorted(set(remove) & {n for n, _ in add})
    if clash:
        raise UsageError(f"both added and removed: {', '.join(clash)}")
    for name in remove:
        check_role_name(name)
    cat = PostgresCatalog(url, acting)
    try:
        probe = cat.probe()
        if not probe.may_migrate:
            raise CatalogError(
                f"catalog {cat.location}: role {probe.role} does not own the catalog's tables",
                hint=f"run this as root (peer-mapped to {ADMIN_ROLE}, the database owner with CREATEROLE), "
                f"or put user={ADMIN_ROLE} in the URL",
            )
        conn = cat.connection()
        try:
            apply_rls(conn)
            removed = [name for name in remove if _remove_and_say(conn, name)]
            for name, uid in add:
                add_user(conn, name, uid)
            users = user_map(conn)
        except psycopg.Error as exc:
            raise CatalogError(
                f"catalog {cat.location}: setting up access as role {probe.role} failed: {str(exc).strip()}",
                hint=f"the role needs to own the database's tables and have CREATEROLE (CREATE ROLE {ADMIN_ROLE} "
                f"LOGIN CREATEROLE; CREATE DATABASE ... OWNER {ADMIN_ROLE})",
            ) from exc
        hba, ident = hba_config(conn.info.dbname, extra_admins=extra_admins)
        return SetupReport(
            location=cat.location, database=conn.info.dbname, role=probe.role,
            schema_version=cat.schema_version(), migrated_from=cat.migrated_from,
            added=list(add), removed=removed, users=users, hba=hba, ident=ident,
        )
    finally:
        cat.close()


def _remove_and_say(conn: Any, name: str) -> bool:
    """Remove ``name``; True when it had a mapping or role to remove."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT 1 FROM {quote_ident(MAP_TABLE)} WHERE role = %s "
                    "UNION ALL SELECT 1 FROM pg_roles WHERE rolname = %s", (name, name))
        present = cur.fetchone() is not None
    remove_user(conn, name)
    return present
