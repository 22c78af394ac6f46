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
* the server, not the client, says whose a row is: a ``BEFORE INSERT OR
  UPDATE`` trigger overwrites ``uid`` (and ``user``) of every row a mapped
  role writes with that role's own; ``WITH CHECK`` applies the policy test
  to new and updated rows as a second line, so no user can write a row in
  another user's name;
* the identity columns are not granted, so no user can claim a ckptid ahead
  of its real writer; ids come from the identity sequence, which PostgreSQL
  advances for an INSERT without the user needing rights on the sequence.

The admin role (``hpcckpt_admin``) owns the tables, so RLS does not apply to
it (no ``FORCE``): the root-run hooks and ``gc --all-users`` connect as it.

:func:`setup_catalog` does it all as the admin (``hpcckpt catalog
pg-setup``): creates or migrates the tables, :func:`apply_rls`,
:func:`add_user` / :func:`remove_user`, and returns the pg_hba.conf and
pg_ident.conf lines (:func:`hba_config`) the server needs; docs/security.md
has the whole procedure.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Sequence
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.errors import CatalogError, NotFoundError

_log = hlog.get("pg_security")

ADMIN_ROLE = "hpcckpt_admin"
USERS_ROLE = "hpcckpt_users"
MAP_TABLE = "hpcckpt_user_map"
UID_FUNCTION = "hpcckpt_session_uid"
STAMP_FUNCTION = "hpcckpt_stamp_owner"
POLICY = "hpcckpt_own_rows"
# Marks the roles add_user created, so remove_user never drops a role the site made for other uses.
ROLE_COMMENT = "hpcckpt catalog user"

# Catalog tables with a uid column, and whether rows also carry the user's name.
USER_TABLES: dict[str, bool] = {"checkpoints": True, "job_events": False, "job_leases": True}
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
    stamp = f"{s}.{quote_ident(STAMP_FUNCTION)}"
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
        # Whose a row is comes from the login, whatever the client sent.
        # jsonb_populate_record skips keys a table lacks (job_events has no
        # "user"). Roles without a mapping (the admin) write what they send.
        f"""CREATE OR REPLACE FUNCTION {stamp}() RETURNS trigger
            LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
            AS $$
            DECLARE mapped BIGINT := {fn}();
            BEGIN
              IF mapped IS NOT NULL THEN
                NEW := jsonb_populate_record(NEW, jsonb_build_object('uid', mapped, 'user', session_user::text));
              END IF;
              RETURN NEW;
            END $$""",
        f"REVOKE ALL ON FUNCTION {stamp}() FROM PUBLIC",
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
        # "(SELECT f())" is evaluated once per statement (an InitPlan); a bare
        # call to a SECURITY DEFINER function, which is never inlined, would run per row.
        own = f"uid = (SELECT {fn}())"
        check = own + (' AND "user" = session_user' if has_user else "")
        stmts += [
            f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
            f"DROP TRIGGER IF EXISTS {quote_ident(STAMP_FUNCTION)} ON {t}",
            f"CREATE TRIGGER {quote_ident(STAMP_FUNCTION)} BEFORE INSERT OR UPDATE ON {t} "
            f"FOR EACH ROW EXECUTE FUNCTION {stamp}()",
            f"DROP POLICY IF EXISTS {quote_ident(POLICY)} ON {t}",
            f"CREATE POLICY {quote_ident(POLICY)} ON {t} FOR ALL TO {users} USING ({own}) WITH CHECK ({check})",
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
        cur.execute("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = %s", (name,))
        row = cur.fetchone()
        if row is None:
            # No password: the server authenticates the user (peer, cert, gss).
            cur.execute(f"CREATE ROLE {role} LOGIN")
            cur.execute(f"COMMENT ON ROLE {role} IS '{ROLE_COMMENT}'")
        elif row[0]:
            raise CatalogError(
                f"role {name!r} already exists and bypasses row-level security (superuser or BYPASSRLS)",
                hint="a checkpointing user needs an ordinary role; rename or demote the existing one first",
            )
        cur.execute(f"GRANT {quote_ident(USERS_ROLE)} TO {role}")
        cur.execute(
            f"INSERT INTO {quote_ident(schema)}.{quote_ident(MAP_TABLE)} (role, uid) VALUES (%s, %s) "
            "ON CONFLICT (role) DO UPDATE SET uid = EXCLUDED.uid",
            (name, uid),
        )
    hlog.event(_log, "pg_security.user", f"catalog role {name} maps to uid {uid}", user=name, uid=uid)


def remove_user(conn: Any, name: str, *, schema: str = "public") -> bool:
    """Remove ``name``'s mapping and catalog access; their rows stay (owned by uid) for the admin.

    The role itself is dropped only if :func:`add_user` created it; a role
    the site made for other uses keeps existing, without catalog access.
    Returns whether the role was dropped.
    """
    check_role_name(name)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(f"DELETE FROM {quote_ident(schema)}.{quote_ident(MAP_TABLE)} WHERE role = %s", (name,))
        cur.execute("SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s", (name,))
        row = cur.fetchone()
        if row is None:
            return False
        if row[0] == ROLE_COMMENT:
            cur.execute(f"DROP ROLE {quote_ident(name)}")
            dropped = True
        else:
            cur.execute(f"REVOKE {quote_ident(USERS_ROLE)} FROM {quote_ident(name)}")
            dropped = False
    hlog.event(_log, "pg_security.user_removed", f"catalog role {name} removed", user=name, dropped=dropped)
    return dropped


def user_map(conn: Any, *, schema: str = "public") -> list[tuple[str, int]]:
    """``(role, uid)`` of every mapped user, by role name."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT role::text, uid FROM {quote_ident(schema)}.{quote_ident(MAP_TABLE)} ORDER BY role")
        return [(str(r), int(u)) for r, u in cur.fetchall()]


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


def local_accounts(names: Sequence[str] = (), *, all_users: bool = False, min_uid: int = 1000,
                   ) -> tuple[list[tuple[str, int]], list[dict[str, str]]]:
    """``(name, uid)`` of the Unix accounts to map, and the accounts skipped with why.

    ``names`` must all exist (a typo is an error, not a skip). ``all_users``
    adds every passwd account with ``uid >= min_uid`` except ``nobody``
    (65534) and names that cannot be roles, which are reported as skipped.
    """
    chosen: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    for name in names:
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            raise NotFoundError(f"no Unix account named {name!r} on this host",
                                hint="check the name with 'getent passwd NAME'") from None
        check_role_name(name)
        chosen[name] = uid
    if all_users:
        for pw in sorted(pwd.getpwall(), key=lambda p: p.pw_name):
            if pw.pw_uid < min_uid or pw.pw_uid == 65534 or pw.pw_name in chosen:
                continue
            try:
                check_role_name(pw.pw_name)
            except CatalogError as exc:
                skipped.append({"user": pw.pw_name, "reason": exc.message})
                continue
            chosen[pw.pw_name] = pw.pw_uid
    return sorted(chosen.items()), skipped
