"""PostgreSQL row-level security for a site-wide catalog: each user sees and changes only their rows.

Filtering queries by uid in hpcckpt is not protection: a user can open the
database with psql and write any SQL. So the server enforces it:

* every Unix user who checkpoints gets a PostgreSQL role of the same name
  (LOGIN, member of ``hpcckpt_users``), authenticated by the server itself
  (``peer`` over the Unix socket, or ``cert``/``gss`` over TCP), never by
  something the client claims;
* the table ``hpcckpt_user_map (role, uid)`` says which uid each role is;
  only the admin role can read or change it;
* the policies compare a row's ``uid`` with the uid mapped to
  ``session_user``. ``session_user`` is the authenticated login: ``SET ROLE``
  changes only ``current_user``, and ``SET SESSION AUTHORIZATION`` needs a
  superuser. A policy on ``current_setting('hpcckpt.uid')`` would be useless,
  since any client can ``SET`` a custom setting;
* ``WITH CHECK`` applies the same test to new and updated rows, so no user
  can write a row in another user's name, and the identity columns are not
  granted, so no user can claim a ckptid before its real writer does.

The admin role (``hpcckpt_admin``) owns the tables, so RLS does not apply to
it (no ``FORCE``): the root-run hooks and ``gc --all-users`` connect as it.

Apply with :func:`apply_rls` as the table owner (after the catalog's own
migrations have created the tables), then :func:`add_user` for each user.
The pg_hba.conf/pg_ident.conf lines are in :func:`hba_config` and
docs/security.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.errors import CatalogError

_log = hlog.get("pg_security")

ADMIN_ROLE = "hpcckpt_admin"
USERS_ROLE = "hpcckpt_users"
MAP_TABLE = "hpcckpt_user_map"
UID_FUNCTION = "hpcckpt_session_uid"
POLICY = "hpcckpt_own_rows"

# Catalog tables with a uid column, and whether rows also carry the user's name.
USER_TABLES: dict[str, bool] = {"checkpoints": True, "job_events": False}
# Readable by every user: needed to check the schema version, holds nothing private.
SHARED_READ_TABLES = ("schema_version",)

_ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.@-]{0,62}$")


def quote_ident(name: str) -> str:
    """A SQL identifier, double-quoted (role and table names come from outside)."""
    if "\x00" in name:
        raise CatalogError(f"identifier {name!r} contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def check_role_name(name: str) -> str:
    """Refuse a Unix user name that cannot safely be a PostgreSQL role name.

    peer authentication compares the role with the Unix name byte for byte,
    so the role must be exactly the user's name; names PostgreSQL would
    truncate (over 63 bytes) or that need quoting tricks are refused.
    """
    if not _ROLE_NAME.fullmatch(name) or name.lower().startswith("pg_") or name in (ADMIN_ROLE, USERS_ROLE):
        raise CatalogError(
            f"user name {name!r} cannot be a PostgreSQL role for the catalog",
            hint="role names must be 1-63 characters of letters, digits, _ . @ -, not starting with pg_",
        )
    return name


def _columns(cur: Any, schema: str, table: str) -> list[str]:
    cur.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s AND is_identity = 'NO' ORDER BY ordinal_position",
        (schema, table),
    )
    return [row[0] for row in cur.fetchall()]


def rls_statements(cur: Any, *, schema: str = "public") -> list[str]:
    """The statements that set up roles, the uid map, the policies and the grants. Idempotent."""
    s = quote_ident(schema)
    users = quote_ident(USERS_ROLE)
    fn = f"{s}.{quote_ident(UID_FUNCTION)}"
    stmts = [
        f"""DO $$ BEGIN
              IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{USERS_ROLE}') THEN
                CREATE ROLE {users} NOLOGIN;
              END IF;
            END $$""",
        f"CREATE TABLE IF NOT EXISTS {s}.{quote_ident(MAP_TABLE)} (role NAME PRIMARY KEY, uid BIGINT NOT NULL UNIQUE)",
        f"REVOKE ALL ON {s}.{quote_ident(MAP_TABLE)} FROM PUBLIC",
        # SECURITY DEFINER so users need no access to the map; search_path
        # pinned so a user cannot shadow the table or operators with their own.
        f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS BIGINT
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
            AS $$ SELECT uid FROM {s}.{quote_ident(MAP_TABLE)} WHERE role = session_user $$""",
        f"REVOKE ALL ON FUNCTION {fn}() FROM PUBLIC",
        f"GRANT EXECUTE ON FUNCTION {fn}() TO {users}",
        f"REVOKE CREATE ON SCHEMA {s} FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA {s} TO {users}",
    ]
    for table in SHARED_READ_TABLES:
        t = f"{s}.{quote_ident(table)}"
        stmts += [f"REVOKE ALL ON {t} FROM PUBLIC", f"GRANT SELECT ON {t} TO {users}"]
    for table, has_user in USER_TABLES.items():
        t = f"{s}.{quote_ident(table)}"
        cols = _columns(cur, schema, table)
        if not cols:
            raise CatalogError(
                f"table {schema}.{table} does not exist",
                hint="open the catalog once as the admin role (it creates its tables), then apply RLS",
            )
        col_list = ", ".join(quote_ident(c) for c in cols)
        check = f"uid = {fn}()" + (' AND "user" = session_user' if has_user else "")
        stmts += [
            f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
            f"DROP POLICY IF EXISTS {quote_ident(POLICY)} ON {t}",
            f"CREATE POLICY {quote_ident(POLICY)} ON {t} FOR ALL TO {users} USING (uid = {fn}()) WITH CHECK ({check})",
            f"REVOKE ALL ON {t} FROM PUBLIC",
            f"GRANT SELECT, DELETE ON {t} TO {users}",
            f"GRANT INSERT ({col_list}), UPDATE ({col_list}) ON {t} TO {users}",
        ]
    return stmts


def apply_rls(conn: Any, *, schema: str = "public") -> None:
    """Set up row-level security on an existing catalog, as its owner (in one transaction)."""
    with conn.transaction(), conn.cursor() as cur:
        for stmt in rls_statements(cur, schema=schema):
            cur.execute(stmt)
    hlog.event(_log, "pg_security.applied", f"row-level security applied to schema {schema}", schema=schema)


def add_user(conn: Any, name: str, uid: int, *, schema: str = "public") -> None:
    """Create (or update) the login role of Unix user ``name`` with ``uid``. Needs CREATEROLE."""
    check_role_name(name)
    if uid <= 0:
        raise CatalogError(f"uid {uid} of {name!r}: root and negative uids get no catalog role")
    role = quote_ident(name)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
        if cur.fetchone() is None:
            # No password: the server authenticates the user (peer, cert, gss).
            cur.execute(f"CREATE ROLE {role} LOGIN")
        cur.execute(f"GRANT {quote_ident(USERS_ROLE)} TO {role}")
        cur.execute(
            f"INSERT INTO {quote_ident(schema)}.{quote_ident(MAP_TABLE)} (role, uid) VALUES (%s, %s) "
            "ON CONFLICT (role) DO UPDATE SET uid = EXCLUDED.uid",
            (name, uid),
        )
    hlog.event(_log, "pg_security.user", f"catalog role {name} maps to uid {uid}", user=name, uid=uid)


def remove_user(conn: Any, name: str, *, schema: str = "public") -> None:
    """Remove ``name``'s mapping and role; their rows stay (owned by uid) for the admin."""
    check_role_name(name)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(f"DELETE FROM {quote_ident(schema)}.{quote_ident(MAP_TABLE)} WHERE role = %s", (name,))
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
        if cur.fetchone() is not None:
            cur.execute(f"DROP ROLE {quote_ident(name)}")


def hba_config(database: str = "hpcckpt", *, extra_admins: Sequence[str] = ()) -> tuple[str, str]:
    """``(pg_hba.conf lines, pg_ident.conf lines)`` for peer authentication on the Unix socket.

    root maps to the admin role (the hooks and gc), every other Unix user to
    the role of their own name. Put these lines before any broader rule.
    """
    hba = f"local  {database}  all  peer map=hpcckpt\n"
    ident = [f"hpcckpt  root  {ADMIN_ROLE}"]
    ident += [f"hpcckpt  {name}  {ADMIN_ROLE}" for name in extra_admins]
    ident.append("hpcckpt  /^(.*)$  \\1")
    return hba, "\n".join(ident) + "\n"
