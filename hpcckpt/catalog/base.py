"""The catalog's interface and the queries both backends share.

A backend provides only transactions (``_write``/``_read``: run a function
with a cursor inside one transaction, retrying when the database is busy) and
its schema. Everything a caller sees is written once here, so SQLite and
PostgreSQL answer the same questions with the same SQL.

Visibility: a catalog acts for one ``User``. A non-root user sees and changes
only rows with their uid; root sees and changes every row. This filter is
for correct answers, not for security: SQLite catalogs are kept apart by their
0700 directories, and a shared PostgreSQL catalog by per-user roles with
row-level security and a trigger that stamps each row's owner
(``hpcckpt catalog pg-setup``, hpcckpt/catalog/pg_security.py).
"""

from __future__ import annotations

import builtins
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from hpcckpt.catalog.model import COLUMNS, LEASE_COLUMNS, CkptRecord, LeaseRecord, LeaseState, Status
from hpcckpt.context import User
from hpcckpt.errors import CatalogError, NotFoundError, PermissionDeniedError

T = TypeVar("T")
Cursor = Any  # a DB-API cursor: sqlite3.Cursor or psycopg.Cursor

_COLS = ", ".join(f'"{c}"' for c in COLUMNS)
_INSERT_COLS = tuple(c for c in COLUMNS if c != "ckptid")
_LEASE_COLS = ", ".join(f'"{c}"' for c in LEASE_COLUMNS)
_LEASE_SET = ", ".join(f'"{c}" = ?' for c in LEASE_COLUMNS if c not in ("uid", "job_id"))


class Catalog(ABC):
    """Checkpoint rows for one store. Thread-safe; one instance per process is enough."""

    backend: str = ""
    #: DB-API placeholder of the backend; the shared SQL is written with '?'.
    placeholder: str = "?"
    #: Row lock for read-modify-write inside a write transaction (PostgreSQL needs it).
    for_update: str = ""

    def __init__(self, user: User, *, clock: Callable[[], float] = time.time) -> None:
        self.user = user
        self._clock = clock

    # -- backend primitives -------------------------------------------------

    @abstractmethod
    def _write(self, fn: Callable[[Cursor], T]) -> T:
        """Run ``fn`` in one write transaction, retrying the whole of it while busy."""

    @abstractmethod
    def _read(self, fn: Callable[[Cursor], T]) -> T:
        """Run ``fn`` in one read-only, consistent snapshot."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def schema_version(self) -> int:
        """The schema version the catalog is at (after any migration on open)."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the catalog lives, for messages (path or URL without password)."""

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    # -- visibility ---------------------------------------------------------

    def _scope(self, uid: int | None) -> int | None:
        """The uid filter a query runs with: root may ask for anyone (None = all)."""
        if self.user.is_root:
            return uid
        if uid is not None and uid != self.user.uid:
            raise PermissionDeniedError(
                f"user {self.user.name} may not see checkpoints of uid {uid}",
                hint="only root can act on other users' checkpoints",
            )
        return self.user.uid

    def _check_owner(self, ckptid: int, owner_uid: int) -> None:
        if not self.user.is_root and owner_uid != self.user.uid:
            raise PermissionDeniedError(
                f"checkpoint {ckptid} belongs to uid {owner_uid}, not to {self.user.name}",
                hint="only the job's owner or root may act on it",
            )

    def _locked_row(self, cur: Cursor, ckptid: int) -> tuple[int, Status]:
        cur.execute(self._sql(f"SELECT uid, status FROM checkpoints WHERE ckptid = ?{self.for_update}"), (ckptid,))
        row = cur.fetchone()
        if row is None:
            raise NotFoundError(f"no checkpoint {ckptid} in catalog {self.location}")
        self._check_owner(ckptid, int(row[0]))
        return int(row[0]), Status(row[1])

    # -- writes -------------------------------------------------------------

    def begin(
        self,
        *,
        job_id: str,
        uid: int,
        user: str,
        node: str,
        engine: str,
        path: str = "",
        step: str | None = None,
        array_job_id: str | None = None,
        array_task_id: str | None = None,
        parent: int | None = None,
        requeue_count: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Add a row in state ``writing`` and return its new, unique, positive ckptid."""
        if not job_id:
            raise CatalogError("begin: empty job id")
        self._scope(uid)
        rec = CkptRecord(
            ckptid=0,
            job_id=str(job_id),
            step=step,
            array_job_id=array_job_id,
            array_task_id=array_task_id,
            uid=uid,
            user=user,
            node=node,
            path=path,
            engine=engine,
            status=Status.WRITING,
            parent=parent,
            created=self._clock(),
            requeue_count=requeue_count,
            meta=dict(meta or {}),
        )
        values = dict(zip(COLUMNS, rec.to_row(), strict=True))
        cols = ", ".join(f'"{c}"' for c in _INSERT_COLS)
        marks = ", ".join("?" for _ in _INSERT_COLS)
        sql = self._sql(f"INSERT INTO checkpoints ({cols}) VALUES ({marks}) RETURNING ckptid")

        def tx(cur: Cursor) -> int:
            cur.execute(sql, tuple(values[c] for c in _INSERT_COLS))
            return int(cur.fetchone()[0])

        return self._write(tx)

    def commit(
        self, ckptid: int, *, path: str, size_bytes: int, duration: float, meta: dict[str, Any] | None = None
    ) -> None:
        """Mark a ``writing`` row committed. Call only once the image is durable at ``path``.

        ``meta``: keys merged into the row's meta in the same transaction (what the flush measured:
        bytes packed, bytes taken from the parent), so the commit stays the one durability point.
        """
        now = self._clock()

        def tx(cur: Cursor) -> None:
            _, status = self._locked_row(cur, ckptid)
            if status is not Status.WRITING:
                raise CatalogError(
                    f"checkpoint {ckptid} is {status.value}, cannot commit it",
                    hint="gc may have declared its writer dead; take a new checkpoint",
                )
            if meta:
                cur.execute(self._sql("SELECT meta FROM checkpoints WHERE ckptid = ?"), (ckptid,))
                raw = cur.fetchone()[0] or "{}"
                merged = {**(raw if isinstance(raw, dict) else json.loads(raw)), **meta}
                cur.execute(self._sql("UPDATE checkpoints SET meta = ? WHERE ckptid = ?"),
                            (json.dumps(merged, sort_keys=True, default=str), ckptid))
            cur.execute(
                self._sql(
                    "UPDATE checkpoints SET status = ?, path = ?, size_bytes = ?, finished = ?, duration = ? "
                    "WHERE ckptid = ?"
                ),
                (Status.COMMITTED.value, path, int(size_bytes), now, float(duration), ckptid),
            )

        self._write(tx)

    def fail(self, ckptid: int, error: str) -> None:
        """Mark a row failed (its writer failed, or its image was found bad). Deleted rows stay deleted."""
        now = self._clock()

        def tx(cur: Cursor) -> None:
            _, status = self._locked_row(cur, ckptid)
            if status is Status.DELETED:
                return
            cur.execute(
                self._sql(
                    "UPDATE checkpoints SET status = ?, error = ?, finished = COALESCE(finished, ?) "
                    "WHERE ckptid = ?"
                ),
                (Status.FAILED.value, error, now, ckptid),
            )

        self._write(tx)

    def mark_corrupt(self, ckptid: int, reason: str) -> bool:
        """Mark a committed image corrupt (damaged, or not the checkpoint its row names); False if not committed.

        Only a committed row changes: a deleted or failed one keeps its state and error.
        """

        def tx(cur: Cursor) -> bool:
            _, status = self._locked_row(cur, ckptid)
            if status is not Status.COMMITTED:
                return False
            cur.execute(
                self._sql("UPDATE checkpoints SET status = ?, error = ? WHERE ckptid = ?"),
                (Status.CORRUPT.value, reason, ckptid),
            )
            return True

        return self._write(tx)

    def mark_deleted(self, ckptid: int) -> None:
        def tx(cur: Cursor) -> None:
            self._locked_row(cur, ckptid)
            cur.execute(
                self._sql("UPDATE checkpoints SET status = ? WHERE ckptid = ?"),
                (Status.DELETED.value, ckptid),
            )

        self._write(tx)

    def record_resume(self, ckptid: int, *, resumed_by: str, new_job_id: str | None = None) -> None:
        """Lineage: which job resumed from this image, and the job a resume submitted, if any."""

        def tx(cur: Cursor) -> None:
            self._locked_row(cur, ckptid)
            cur.execute(
                self._sql("UPDATE checkpoints SET resumed_by = ?, new_job_id = ? WHERE ckptid = ?"),
                (resumed_by, new_job_id, ckptid),
            )

        self._write(tx)

    def record_job_event(self, job_id: str, *, uid: int, event: str, detail: str = "", node: str = "") -> None:
        """A job-level event (end state, requeue, node failure) from the epilog or the runner."""
        self._scope(uid)
        now = self._clock()

        def tx(cur: Cursor) -> None:
            cur.execute(
                self._sql("INSERT INTO job_events (job_id, uid, event, detail, node, ts) VALUES (?, ?, ?, ?, ?, ?)"),
                (str(job_id), uid, event, detail, node, now),
            )

        self._write(tx)

    def insert_records(self, records: Iterable[CkptRecord]) -> int:
        """Insert rows with their own ckptids (rebuild, import); existing ckptids are skipped.

        Returns how many rows were new. The ckptid counter moves past the
        largest inserted id, so later ``begin`` calls never reuse one.
        """
        batch = list(records)
        for rec in batch:
            if rec.ckptid <= 0:
                raise CatalogError(f"insert_records: ckptid must be positive, got {rec.ckptid}")
            self._scope(rec.uid)
        if not batch:
            return 0
        marks = ", ".join("?" for _ in COLUMNS)
        sql = self._sql(f"INSERT INTO checkpoints ({_COLS}) VALUES ({marks}) ON CONFLICT (ckptid) DO NOTHING")

        def tx(cur: Cursor) -> int:
            cur.execute("SELECT count(*) FROM checkpoints")
            before = int(cur.fetchone()[0])
            cur.executemany(sql, [r.to_row() for r in batch])
            self._after_explicit_ids(cur)
            cur.execute("SELECT count(*) FROM checkpoints")
            return int(cur.fetchone()[0]) - before

        return self._write(tx)

    def _after_explicit_ids(self, cur: Cursor) -> None:  # noqa: B027 - optional hook
        """Backends whose id counter ignores explicit ids move it forward here."""

    # -- reads --------------------------------------------------------------

    def _select(self, where: str, params: tuple[Any, ...], order: str, limit: int | None = None) -> list[CkptRecord]:
        sql = f"SELECT {_COLS} FROM checkpoints WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        sql = self._sql(sql)

        def tx(cur: Cursor) -> list[CkptRecord]:
            cur.execute(sql, params)
            return [CkptRecord.from_row(tuple(r)) for r in cur.fetchall()]

        return self._read(tx)

    @staticmethod
    def _uid_clause(uid: int | None) -> tuple[str, tuple[Any, ...]]:
        return ("", ()) if uid is None else (" AND uid = ?", (uid,))

    def get(self, ckptid: int) -> CkptRecord | None:
        rows = self._select("ckptid = ?", (int(ckptid),), "ckptid")
        if not rows:
            return None
        self._check_owner(ckptid, rows[0].uid)
        return rows[0]

    def latest(self, job_id: str, *, uid: int | None = None) -> CkptRecord | None:
        """The newest committed image of the job: the one a resume takes."""
        scope = self._scope(uid)
        extra, params = self._uid_clause(scope)
        rows = self._select(
            f"job_id = ? AND status = ?{extra}",
            (str(job_id), Status.COMMITTED.value, *params),
            "ckptid DESC",
            limit=1,
        )
        return rows[0] if rows else None

    def committed(self, job_id: str, *, uid: int | None = None) -> list[CkptRecord]:
        """The job's committed images, newest first."""
        scope = self._scope(uid)
        extra, params = self._uid_clause(scope)
        return self._select(
            f"job_id = ? AND status = ?{extra}",
            (str(job_id), Status.COMMITTED.value, *params),
            "ckptid DESC",
        )

    def list(
        self, job_id: str | None = None, *, uid: int | None = None, include_deleted: bool = False
    ) -> list[CkptRecord]:
        """Rows in ckptid (that is, creation) order."""
        scope = self._scope(uid)
        clauses: list[str] = ["1 = 1"]
        params: list[Any] = []
        if job_id is not None:
            clauses.append("job_id = ?")
            params.append(str(job_id))
        if scope is not None:
            clauses.append("uid = ?")
            params.append(scope)
        if not include_deleted:
            clauses.append("status <> ?")
            params.append(Status.DELETED.value)
        return self._select(" AND ".join(clauses), tuple(params), "ckptid")

    def job_events(self, job_id: str, *, uid: int | None = None) -> builtins.list[dict[str, Any]]:
        scope = self._scope(uid)
        extra, params = self._uid_clause(scope)
        sql = self._sql(
            f"SELECT id, job_id, uid, event, detail, node, ts FROM job_events WHERE job_id = ?{extra} ORDER BY id"
        )

        def tx(cur: Cursor) -> builtins.list[dict[str, Any]]:
            cur.execute(sql, (str(job_id), *params))
            keys = ("id", "job_id", "uid", "event", "detail", "node", "ts")
            return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]

        return self._read(tx)

    # -- job leases (hpcckpt.core.lease decides; these only read and compare-and-swap) --

    def _lease_uid(self, uid: int | None) -> int:
        scope = self._scope(uid)
        return self.user.uid if scope is None else scope

    def get_lease(self, job_id: str, *, uid: int | None = None) -> LeaseRecord | None:
        """The job's lease row (live or how its last run ended), or None if it never had one."""
        owner = self._lease_uid(uid)
        sql = self._sql(f"SELECT {_LEASE_COLS} FROM job_leases WHERE uid = ? AND job_id = ?")

        def tx(cur: Cursor) -> LeaseRecord | None:
            cur.execute(sql, (owner, str(job_id)))
            row = cur.fetchone()
            return None if row is None else LeaseRecord.from_row(tuple(row))

        return self._read(tx)

    def swap_lease(self, lease: LeaseRecord, *, expect_token: str | None) -> bool:
        """Write ``lease`` only if the row still holds ``expect_token`` (None: only if there is no row).

        The one atomic step of taking a lease: whoever read the same row and
        decided the same way loses here, and reads the winner's lease next.
        """
        self._scope(lease.uid)
        values = dict(zip(LEASE_COLUMNS, lease.to_row(), strict=True))
        if expect_token is None:
            marks = ", ".join("?" for _ in LEASE_COLUMNS)
            sql = self._sql(f"INSERT INTO job_leases ({_LEASE_COLS}) VALUES ({marks}) "
                            "ON CONFLICT (uid, job_id) DO NOTHING")
            params: tuple[Any, ...] = tuple(values[c] for c in LEASE_COLUMNS)
        else:
            sql = self._sql(f"UPDATE job_leases SET {_LEASE_SET} WHERE uid = ? AND job_id = ? AND token = ?")
            params = (*(values[c] for c in LEASE_COLUMNS if c not in ("uid", "job_id")),
                      lease.uid, lease.job_id, expect_token)

        def tx(cur: Cursor) -> bool:
            cur.execute(sql, params)
            return int(cur.rowcount) == 1

        return self._write(tx)

    def renew_lease(self, job_id: str, token: str, *, expires: float, uid: int | None = None) -> bool:
        """Push a live lease's expiry on; False if it is no longer ours (taken over or ended)."""
        owner = self._lease_uid(uid)
        sql = self._sql("UPDATE job_leases SET renewed = ?, expires = ? "
                        "WHERE uid = ? AND job_id = ? AND token = ? AND state = ?")
        now = self._clock()

        def tx(cur: Cursor) -> bool:
            cur.execute(sql, (now, float(expires), owner, str(job_id), token, LeaseState.LIVE.value))
            return int(cur.rowcount) == 1

        return self._write(tx)

    def end_lease(self, job_id: str, token: str, *, state: LeaseState, exit_status: int | None = None,
                  ended: float | None = None, options: dict[str, Any] | None = None,
                  uid: int | None = None) -> bool:
        """Let go of our lease, saying how the run ended; False if it was no longer ours."""
        owner = self._lease_uid(uid)
        sets = "state = ?, exit_status = ?, ended = ?" + (", options = ?" if options is not None else "")
        sql = self._sql(f"UPDATE job_leases SET {sets} WHERE uid = ? AND job_id = ? AND token = ?")
        params: list[Any] = [LeaseState(state).value, exit_status, ended]
        if options is not None:
            params.append(json.dumps(options, sort_keys=True, default=str))
        params += [owner, str(job_id), token]

        def tx(cur: Cursor) -> bool:
            cur.execute(sql, tuple(params))
            return int(cur.rowcount) == 1

        return self._write(tx)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "location": self.location, "user": self.user.name}

