"""SQLite catalog: one file per user, ``ROOT/USER/catalog.sqlite``, on a shared filesystem.

Writers on many nodes share the file, and the parallel filesystem's byte-range
locks (which SQLite relies on) are weaker than a local disk's. So:

- every write transaction holds ``catalog.sqlite.lock`` (an ``flock`` waited
  for in the kernel, :mod:`hpcckpt.fs.flock`) first, then ``BEGIN
  IMMEDIATE``: writers queue on the lock instead of failing on SQLite's, and
  a reader never sees a half-written file;
- rollback journal (``journal_mode=DELETE``), never WAL: WAL's shared-memory
  index does not work across nodes;
- ``busy_timeout`` plus retries with jittered backoff, so "database is locked"
  is converted to a ``CatalogError`` only after a generous deadline;
- the schema is versioned with ``PRAGMA user_version``; migrations only go
  forward, and a newer version than this code knows is refused.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from hpcckpt import log as hlog
from hpcckpt.catalog.base import Catalog, Cursor
from hpcckpt.catalog.schema import SCHEMA_VERSION, SQLITE_MIGRATIONS
from hpcckpt.context import User
from hpcckpt.errors import CatalogError, CatalogVersionError
from hpcckpt.fs import flock
from hpcckpt.fs.safe import as_fs_user

T = TypeVar("T")
_log = hlog.get("catalog")

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return True
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SqliteCatalog(Catalog):
    backend = "sqlite"

    def __init__(
        self,
        path: Path,
        user: User,
        *,
        busy_timeout_ms: int = 5_000,
        deadline_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(user, clock=clock)
        self.path = Path(path)
        self._deadline_s = deadline_s
        self._busy_ms = busy_timeout_ms
        # One connection per Catalog, shared by threads under this lock.
        self._tlock = threading.RLock()
        self._lock_path = str(self.path) + ".lock"
        self._conn: sqlite3.Connection | None = None
        with self._identity():
            self._prepare_file()
        self._connect()
        self._migrate()

    @property
    def location(self) -> str:
        return str(self.path)

    @contextmanager
    def _identity(self) -> Iterator[None]:
        # Root acting for a user touches the user's catalog with the user's rights.
        with as_fs_user(self.user.uid, self.user.gid):
            yield

    def _prepare_file(self) -> None:
        """Create the database 0600 ourselves: SQLite would use the umask, and journals copy its mode."""
        if not self.path.parent.is_dir():
            raise CatalogError(
                f"catalog directory {self.path.parent} does not exist",
                hint="check --store / $HPCCKPT_STORE; the store creates ROOT/USER on first checkpoint",
            )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CatalogError(
                f"{self.path}: cannot open catalog: {exc.strerror}",
                hint="a symlink here is refused; check the file's owner and mode (0600)",
            ) from exc
        os.close(fd)

    def _connect(self) -> None:
        def setup() -> sqlite3.Connection:
            conn = sqlite3.connect(
                str(self.path),
                timeout=self._busy_ms / 1000.0,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_ms)}")
                mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
                if str(mode).lower() != "delete":
                    raise CatalogError(f"{self.path}: cannot switch journal mode to DELETE (got {mode})")
                conn.execute("PRAGMA synchronous = FULL")
            except BaseException:
                conn.close()
                raise
            return conn

        self._conn = self._retry(setup, what="open")

    def close(self) -> None:
        with self._tlock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- retry machinery ----------------------------------------------------

    def _retry(self, fn: Callable[[], T], *, what: str) -> T:
        deadline = time.monotonic() + self._deadline_s
        delay = 0.005
        attempts = 0
        while True:
            attempts += 1
            try:
                with self._identity():
                    return fn()
            except sqlite3.DatabaseError as exc:
                if not (isinstance(exc, sqlite3.OperationalError) and _is_busy(exc)):
                    full = getattr(exc, "sqlite_errorcode", None) == 13  # SQLITE_FULL
                    raise CatalogError(
                        f"{self.path}: {what} failed: {exc}",
                        hint=f"the disk holding {self.path.parent} is full: free space there, or choose "
                        "another store (--store, $HPCCKPT_STORE)" if full
                        else "if the file is damaged, move it aside and run 'hpcckpt catalog rebuild'",
                    ) from exc
                if time.monotonic() >= deadline:
                    raise CatalogError(
                        f"{self.path}: still locked after {self._deadline_s:.0f}s and {attempts} attempts ({what})",
                        hint="another process holds the catalog; check for hung hpcckpt processes on other nodes",
                    ) from exc
            # Full jitter: many nodes retrying in lockstep would collide again.
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 0.5)

    def _conn_or_raise(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CatalogError(f"{self.path}: catalog is closed")
        return self._conn

    def _run_tx(self, fn: Callable[[Cursor], T], begin: str) -> T:
        conn = self._conn_or_raise()
        cur = conn.cursor()
        cur.execute(begin)
        try:
            result = fn(cur)
            cur.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            cur.close()
        return result

    def _write(self, fn: Callable[[Cursor], T]) -> T:
        def attempt() -> T:
            try:
                with flock.exclusive(self._lock_path, self._deadline_s):
                    return self._run_tx(fn, "BEGIN IMMEDIATE")
            except flock.LockTimeout as exc:
                raise CatalogError(
                    f"{self._lock_path}: could not take the catalog lock in {self._deadline_s:.0f}s",
                    hint="another writer holds it; check for hung hpcckpt processes",
                ) from exc
            except OSError as exc:
                raise CatalogError(
                    f"{self._lock_path}: cannot lock the catalog: {exc.strerror}",
                    hint="the filesystem must support flock (Lustre: mount with -o flock)",
                ) from exc

        with self._tlock:
            return self._retry(attempt, what="write")

    def _read(self, fn: Callable[[Cursor], T]) -> T:
        with self._tlock:
            return self._retry(lambda: self._run_tx(fn, "BEGIN"), what="read")

    # -- schema -------------------------------------------------------------

    def _version(self) -> int:
        def tx(cur: Cursor) -> int:
            cur.execute("PRAGMA user_version")
            return int(cur.fetchone()[0])

        return self._read(tx)

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise CatalogVersionError(
                f"{self.path}: catalog schema version {version} is newer than this hpcckpt "
                f"understands ({SCHEMA_VERSION})",
                hint="upgrade hpcckpt on this node; nothing was changed",
            )

    def _migrate(self) -> None:
        version = self._version()
        self._refuse_newer(version)
        if version == SCHEMA_VERSION:
            return

        def tx(cur: Cursor) -> int:
            # Re-read under the write lock: another node may have migrated meanwhile.
            cur.execute("PRAGMA user_version")
            current = int(cur.fetchone()[0])
            self._refuse_newer(current)
            for target, statements in SQLITE_MIGRATIONS:
                if target <= current:
                    continue
                for stmt in statements:
                    cur.execute(stmt)
                cur.execute(f"PRAGMA user_version = {int(target)}")
                current = target
            return current

        new = self._write(tx)
        # Creating a new catalog is routine; upgrading an existing one is news.
        level = logging.INFO if version > 0 else logging.DEBUG
        hlog.event(_log, "catalog.migrated", f"catalog schema at version {new}", level,
                   path=str(self.path), was=version)

    def schema_version(self) -> int:
        return self._version()
