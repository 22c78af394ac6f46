"""PostgreSQL catalog, selected by a ``postgresql://`` URL: one database for a whole site.

The server does the concurrency: each call is one transaction at READ
COMMITTED, rows touched by a read-modify-write are locked ``FOR UPDATE``,
and ckptids come from an identity column. Lost connections and serialization
failures are retried until a deadline, with jitter.

Opening a catalog first *reads* its schema version (a read-only
transaction every role can run) and migrates only when it is behind, and only
when the connecting role owns the tables (or may create them). An ordinary
user's role, under row-level security (:mod:`hpcckpt.catalog.pg_security`), never
tries to change the schema: a catalog that is behind is reported with the
admin command that fixes it. Migrations run under an advisory lock, so two
nodes starting at once do not both migrate.

Who connects: a URL that names no user (and no ``$PGUSER``) connects as the
Unix user's own role, which is what peer authentication expects, except
that root connects as the admin role ``hpcckpt_admin``, so one site-wide
URL serves both the users' jobs and root's hooks.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from hpcckpt import log as hlog
from hpcckpt.catalog import pg_security
from hpcckpt.catalog.base import Catalog, Cursor
from hpcckpt.catalog.schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION
from hpcckpt.context import User
from hpcckpt.errors import CatalogError, CatalogVersionError

T = TypeVar("T")
_log = hlog.get("catalog")

# Arbitrary constant naming hpcckpt's schema lock among advisory locks.
_MIGRATION_LOCK = 0x6870636B  # "hpck"

# libpq's words for a connection the server refused for good (wrong role,
# failed peer/cert check, no pg_hba line, no database). Retrying these for
# minutes would only hide the cause; connect errors carry no SQLSTATE.
_REFUSED = re.compile(
    r"authentication failed|pg_hba\.conf|does not exist|not permitted to log in|"
    r"permission denied for database|too many connections for role",
    re.IGNORECASE,
)

SETUP_HINT = "ask the admin to run 'hpcckpt catalog pg-setup --url URL' as root (see docs/security.md)"


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def session_role(params: Mapping[str, object], *, euid: int, environ: Mapping[str, str]) -> str | None:
    """The role to connect as when the URL (parsed into ``params``) leaves it open, or None for libpq's choice.

    Only root gets one: libpq would ask for a role named ``root``, which the
    site's peer map sends to the admin role, so ask for that one directly.
    """
    if params.get("user") or environ.get("PGUSER") or euid != 0:
        return None
    return pg_security.ADMIN_ROLE


@dataclass(frozen=True)
class Probe:
    """What a role can learn about a catalog without changing it."""

    version: int
    #: The role owns the tables (or, with no tables yet, may create them).
    may_migrate: bool
    #: The role may read ``schema_version`` (false: it has no grants here yet).
    may_read: bool
    role: str
    #: The uid row-level security maps this login to; None for the admin or without RLS.
    mapped_uid: int | None
    #: Row-level security is set up in this database.
    rls: bool


class PostgresCatalog(Catalog):
    backend = "postgresql"
    placeholder = "%s"
    for_update = " FOR UPDATE"

    def __init__(
        self,
        url: str,
        user: User,
        *,
        deadline_s: float = 120.0,
        connect_timeout_s: int = 10,
        clock: Callable[[], float] = time.time,
        migrate: bool = True,
    ) -> None:
        super().__init__(user, clock=clock)
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
        except ImportError as exc:
            raise CatalogError(
                "a postgresql:// catalog needs psycopg 3",
                hint="pip install 'hpcckpt[postgres]' (psycopg[binary])",
            ) from exc
        self._psycopg: Any = psycopg
        self.url = url
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise CatalogError(
                f"catalog URL {redact_url(url)} is malformed: {exc}",
                hint="expected postgresql://[user@]host[:port]/dbname, or postgresql:///dbname?host=/run/postgresql "
                "for the local socket",
            ) from exc
        self._role = session_role(params, euid=os.geteuid(), environ=os.environ)
        #: The role the server authenticated, once connected.
        self.role = ""
        self._deadline_s = deadline_s
        self._connect_timeout_s = connect_timeout_s
        self._tlock = threading.RLock()
        self._conn: Any = None
        self.migrated_from: int | None = None
        try:
            self._open(migrate=migrate)
        except BaseException:
            self.close()
            raise

    @property
    def location(self) -> str:
        return redact_url(self.url)

    def _connect(self) -> Any:
        if self._conn is None or self._conn.closed:
            extra = {"user": self._role} if self._role else {}
            self._conn = self._psycopg.connect(
                self.url, autocommit=True, connect_timeout=self._connect_timeout_s, **extra
            )
        return self._conn

    def connection(self) -> Any:
        """The open psycopg connection (autocommit), for admin tools working beside the catalog."""
        with self._tlock:
            return self._connect()

    def close(self) -> None:
        with self._tlock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _transient(self, exc: Exception) -> bool:
        errors = self._psycopg.errors
        if isinstance(exc, self._psycopg.OperationalError) and _REFUSED.search(str(exc)):
            return False
        return isinstance(
            exc,
            (errors.SerializationFailure, errors.DeadlockDetected, self._psycopg.OperationalError),
        )

    def _error(self, exc: Exception) -> CatalogError:
        """A permanent failure, with what to do about it."""
        text = str(exc).strip()
        if isinstance(exc, self._psycopg.errors.InsufficientPrivilege):
            return CatalogError(
                f"catalog {self.location}: {text}",
                hint="the catalog's access rules refuse this to your database role; changes beyond your own "
                "checkpoints (such as 'catalog rebuild', which sets ckptids) are for root, who connects as "
                f"{pg_security.ADMIN_ROLE}",
            )
        if isinstance(exc, self._psycopg.OperationalError) and _REFUSED.search(text):
            if self._role is None and not self.user.is_root:
                hint = f"your account may not have a catalog role yet: {SETUP_HINT}, with --add-user {self.user.name}"
            else:
                hint = (f"the URL's role (root's default: {pg_security.ADMIN_ROLE}) must exist, and pg_hba.conf and "
                        "pg_ident.conf must let this Unix user log in as it; 'hpcckpt catalog pg-setup' prints them")
            return CatalogError(f"catalog {self.location}: the server refused the connection: {text}", hint=hint)
        return CatalogError(f"catalog {self.location}: {text}")

    def _tx(self, fn: Callable[[Cursor], T], *, read_only: bool) -> T:
        deadline = time.monotonic() + self._deadline_s
        delay = 0.01
        attempts = 0
        with self._tlock:
            while True:
                attempts += 1
                try:
                    conn = self._connect()
                    with conn.transaction(), conn.cursor() as cur:
                        if read_only:
                            cur.execute("SET TRANSACTION READ ONLY")
                        return fn(cur)
                except self._psycopg.Error as exc:
                    if not self._transient(exc):
                        raise self._error(exc) from exc
                    if time.monotonic() >= deadline:
                        raise CatalogError(
                            f"catalog {self.location}: gave up after {attempts} attempts: {exc}".strip(),
                            hint="is the PostgreSQL server up and reachable from this node?",
                        ) from exc
                    if self._conn is not None and self._conn.broken:
                        self._conn = None
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 1.0)

    def _write(self, fn: Callable[[Cursor], T]) -> T:
        return self._tx(fn, read_only=False)

    def _read(self, fn: Callable[[Cursor], T]) -> T:
        return self._tx(fn, read_only=True)

    def _after_explicit_ids(self, cur: Cursor) -> None:
        # An identity column's sequence does not see explicit ids: move it past them.
        cur.execute(
            "SELECT setval(pg_get_serial_sequence('checkpoints', 'ckptid'), "
            "GREATEST((SELECT max(ckptid) FROM checkpoints), 1))"
        )

    # -- schema -------------------------------------------------------------

    @staticmethod
    def _probe_tx(cur: Cursor) -> Probe:
        # Only catalog functions here: they work for any role, before any grant.
        cur.execute(
            """SELECT c.oid IS NOT NULL,
                      CASE WHEN c.oid IS NULL
                           THEN COALESCE(has_schema_privilege(current_schema(), 'CREATE'), false)
                           ELSE pg_has_role(c.relowner, 'USAGE') END,
                      c.oid IS NOT NULL AND has_table_privilege(c.oid, 'SELECT'),
                      session_user::text,
                      to_regclass(%s) IS NOT NULL,
                      to_regprocedure(%s)
               FROM (SELECT to_regclass('schema_version') AS reg) r LEFT JOIN pg_class c ON c.oid = r.reg""",
            (pg_security.MAP_TABLE, f"{pg_security.UID_FUNCTION}()"),
        )
        exists, may_migrate, may_read, role, rls, uid_fn = cur.fetchone()
        version = 0
        if exists and may_read:
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            version = int(row[0]) if row is not None else 0
        mapped: int | None = None
        if uid_fn is not None:
            cur.execute("SELECT has_function_privilege(%s::regprocedure, 'EXECUTE')", (uid_fn,))
            if cur.fetchone()[0]:
                cur.execute(f"SELECT {pg_security.UID_FUNCTION}()")
                value = cur.fetchone()[0]
                mapped = None if value is None else int(value)
        return Probe(version=version, may_migrate=bool(may_migrate), may_read=bool(not exists or may_read),
                      role=str(role), mapped_uid=mapped, rls=bool(rls))

    def probe(self) -> Probe:
        """The schema version and what this connection's role may do, changing nothing."""
        return self._read(self._probe_tx)

    def _open(self, *, migrate: bool) -> None:
        found = self.probe()
        self.role = found.role
        if not found.may_read:
            raise CatalogError(
                f"catalog {self.location}: role {found.role} may not read the catalog",
                hint=f"{SETUP_HINT}, with --add-user {found.role}",
            )
        self._refuse_newer(found.version)
        if found.version < SCHEMA_VERSION:
            if not (migrate and found.may_migrate):
                raise CatalogError(
                    f"catalog {self.location}: schema version {found.version}, this hpcckpt needs "
                    f"{SCHEMA_VERSION}, and role {found.role} may not upgrade it (only the tables' owner may)",
                    hint=SETUP_HINT,
                )
            self._migrate()
        if found.rls and found.mapped_uid is None and not found.may_migrate:
            raise CatalogError(
                f"catalog {self.location}: role {found.role} has no uid in the catalog's user map",
                hint=f"{SETUP_HINT}, with --add-user {found.role}",
            )
        if found.mapped_uid is not None and found.mapped_uid != self.user.uid:
            # The server stamps rows with the mapped uid; a wrong map would
            # file this user's checkpoints under somebody else's uid.
            raise CatalogError(
                f"catalog {self.location}: role {found.role} is mapped to uid {found.mapped_uid}, "
                f"but hpcckpt runs for {self.user.name} (uid {self.user.uid})",
                hint=f"{SETUP_HINT}, with --add-user {self.user.name} to correct the mapping",
            )

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise CatalogVersionError(
                f"catalog {self.location}: schema version {version} is newer than this hpcckpt "
                f"understands ({SCHEMA_VERSION})",
                hint="upgrade hpcckpt on this node; nothing was changed",
            )

    def _migrate(self) -> None:
        def tx(cur: Cursor) -> tuple[int, int]:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            if row is None:
                cur.execute("INSERT INTO schema_version (version) VALUES (0)")
                current = 0
            else:
                current = int(row[0])
            was = current
            self._refuse_newer(current)
            for target, statements in POSTGRES_MIGRATIONS:
                if target <= current:
                    continue
                for stmt in statements:
                    cur.execute(stmt)
                cur.execute("UPDATE schema_version SET version = %s", (target,))
                current = target
            if was != current and _has_table(cur, pg_security.MAP_TABLE):
                # Row-level security is on: new tables and columns must get
                # their policies and grants in the same transaction, or users
                # would lose access (or gain it) until an admin re-applies them.
                for stmt in pg_security.rls_statements(cur):
                    cur.execute(stmt)
            return was, current

        was, now = self._write(tx)
        if was != now:
            self.migrated_from = was
            hlog.event(_log, "catalog.migrated", f"catalog schema at version {now}", url=self.location, was=was)

    def schema_version(self) -> int:
        def tx(cur: Cursor) -> int:
            cur.execute("SELECT version FROM schema_version")
            return int(cur.fetchone()[0])

        return self._read(tx)

    def describe(self) -> dict[str, Any]:
        doc = super().describe()
        doc["role"] = self.role
        return doc


def _has_table(cur: Cursor, name: str) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
    return bool(cur.fetchone()[0])
