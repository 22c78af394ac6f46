"""PostgreSQL catalog, selected by a ``postgresql://`` URL: one database for a whole site.

The server does the concurrency: each call is one transaction at READ
COMMITTED, rows touched by a read-modify-write are locked ``FOR UPDATE``,
and ckptids come from an identity column. Lost connections and serialization
failures are retried until a deadline, with jitter. The schema version lives
in ``schema_version``; migrations run under an advisory lock so two nodes
starting at once do not both migrate.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from hpcckpt import log as hlog
from hpcckpt.catalog.base import Catalog, Cursor
from hpcckpt.catalog.schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION
from hpcckpt.context import User
from hpcckpt.errors import CatalogError, CatalogVersionError

T = TypeVar("T")
_log = hlog.get("catalog")

# Arbitrary constant naming hpcckpt's schema lock among advisory locks.
_MIGRATION_LOCK = 0x6870636B  # "hpck"


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


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
    ) -> None:
        super().__init__(user, clock=clock)
        try:
            import psycopg
        except ImportError as exc:
            raise CatalogError(
                "a postgresql:// catalog needs psycopg 3",
                hint="pip install 'hpcckpt[postgres]' (psycopg[binary])",
            ) from exc
        self._psycopg: Any = psycopg
        self.url = url
        self._deadline_s = deadline_s
        self._connect_timeout_s = connect_timeout_s
        self._tlock = threading.RLock()
        self._conn: Any = None
        self._migrate()

    @property
    def location(self) -> str:
        return redact_url(self.url)

    def _connect(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self._psycopg.connect(
                self.url, autocommit=True, connect_timeout=self._connect_timeout_s
            )
        return self._conn

    def close(self) -> None:
        with self._tlock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _transient(self, exc: Exception) -> bool:
        errors = self._psycopg.errors
        return isinstance(
            exc,
            (errors.SerializationFailure, errors.DeadlockDetected, self._psycopg.OperationalError),
        )

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
                        raise CatalogError(f"catalog {self.location}: {exc}".strip()) from exc
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
            if current > SCHEMA_VERSION:
                raise CatalogVersionError(
                    f"catalog {self.location}: schema version {current} is newer than this hpcckpt "
                    f"understands ({SCHEMA_VERSION})",
                    hint="upgrade hpcckpt on this node; nothing was changed",
                )
            for target, statements in POSTGRES_MIGRATIONS:
                if target <= current:
                    continue
                for stmt in statements:
                    cur.execute(stmt)
                cur.execute("UPDATE schema_version SET version = %s", (target,))
                current = target
            return was, current

        was, now = self._write(tx)
        if was != now:
            hlog.event(_log, "catalog.migrated", f"catalog schema at version {now}", url=self.location, was=was)

    def schema_version(self) -> int:
        def tx(cur: Cursor) -> int:
            cur.execute("SELECT version FROM schema_version")
            return int(cur.fetchone()[0])

        return self._read(tx)
