"""Catalog schema versions, one list per backend, forward-only.

Each entry is ``(version, statements)``: the statements that take a catalog
from ``version - 1`` to ``version``. Never edit a released entry; add a new
one. A catalog whose version is above ``SCHEMA_VERSION`` was written by a
newer hpcckpt and is refused rather than guessed at.

Every row carries ``uid`` and ``user`` so that PostgreSQL row-level security
(one role per user) can be added later without a data migration.
"""

from __future__ import annotations

SCHEMA_VERSION = 3

_STATUS_CHECK = "status IN ('writing', 'committed', 'failed', 'deleted')"
# Version 2: an image found damaged, or not the checkpoint its row names, is marked 'corrupt'.
_STATUS_CHECK_2 = "status IN ('writing', 'committed', 'failed', 'deleted', 'corrupt')"
_LEASE_STATE_CHECK = "state IN ('live', 'stopped', 'exited')"


def _lease_table(integer: str, real: str) -> str:
    """Version 3: one row per job, the lease that keeps a second runner from running it at the same time.

    The row outlives its runner: ``state`` says how the last run ended
    (``exited``: the job ended on its own, with ``exit_status`` at
    ``ended``), and ``options`` keeps the run options a resume goes on with.
    Keyed by (uid, job_id): two users may both name a job "sim", and under
    row-level security neither may even learn of the other's row.
    """
    return f"""CREATE TABLE job_leases (
                uid {integer} NOT NULL,
                job_id TEXT NOT NULL,
                "user" TEXT NOT NULL,
                token TEXT NOT NULL,
                state TEXT NOT NULL CHECK ({_LEASE_STATE_CHECK}),
                node TEXT NOT NULL DEFAULT '',
                host TEXT NOT NULL DEFAULT '',
                boot_id TEXT NOT NULL DEFAULT '',
                pid {integer} NOT NULL DEFAULT 0,
                pid_start {integer} NOT NULL DEFAULT 0,
                slurm_job_id TEXT,
                slurm_step TEXT,
                restart_count INTEGER NOT NULL DEFAULT 0,
                acquired {real} NOT NULL,
                renewed {real} NOT NULL,
                expires {real} NOT NULL,
                ended {real},
                exit_status INTEGER,
                options TEXT NOT NULL DEFAULT '{{}}',
                PRIMARY KEY (uid, job_id)
            )"""


SQLITE_MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            f"""CREATE TABLE checkpoints (
                ckptid INTEGER PRIMARY KEY AUTOINCREMENT CHECK (ckptid > 0),
                job_id TEXT NOT NULL,
                step TEXT,
                array_job_id TEXT,
                array_task_id TEXT,
                uid INTEGER NOT NULL,
                "user" TEXT NOT NULL,
                node TEXT NOT NULL DEFAULT '',
                path TEXT NOT NULL DEFAULT '',
                size_bytes INTEGER NOT NULL DEFAULT 0,
                engine TEXT NOT NULL,
                status TEXT NOT NULL CHECK ({_STATUS_CHECK}),
                parent INTEGER,
                created REAL NOT NULL,
                finished REAL,
                duration REAL,
                error TEXT NOT NULL DEFAULT '',
                requeue_count INTEGER NOT NULL DEFAULT 0,
                resumed_by TEXT,
                new_job_id TEXT,
                meta TEXT NOT NULL DEFAULT '{{}}'
            )""",
            # The question asked most, from every node: latest committed image of a job.
            "CREATE INDEX checkpoints_job_latest ON checkpoints (job_id, status, ckptid)",
            "CREATE INDEX checkpoints_uid ON checkpoints (uid, ckptid)",
            """CREATE TABLE job_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                job_id TEXT NOT NULL,
                uid INTEGER NOT NULL,
                event TEXT NOT NULL,
                detail TEXT NOT NULL DEFAULT '',
                node TEXT NOT NULL DEFAULT '',
                ts REAL NOT NULL
            )""",
            "CREATE INDEX job_events_job ON job_events (job_id, id)",
        ],
    ),
    (
        2,
        # SQLite cannot alter a CHECK constraint: the table is rebuilt with the wider one, rows and
        # ckptids unchanged (the AUTOINCREMENT counter is carried over, so no ckptid is ever reused).
        [
            f"""CREATE TABLE checkpoints_v2 (
                ckptid INTEGER PRIMARY KEY AUTOINCREMENT CHECK (ckptid > 0),
                job_id TEXT NOT NULL,
                step TEXT,
                array_job_id TEXT,
                array_task_id TEXT,
                uid INTEGER NOT NULL,
                "user" TEXT NOT NULL,
                node TEXT NOT NULL DEFAULT '',
                path TEXT NOT NULL DEFAULT '',
                size_bytes INTEGER NOT NULL DEFAULT 0,
                engine TEXT NOT NULL,
                status TEXT NOT NULL CHECK ({_STATUS_CHECK_2}),
                parent INTEGER,
                created REAL NOT NULL,
                finished REAL,
                duration REAL,
                error TEXT NOT NULL DEFAULT '',
                requeue_count INTEGER NOT NULL DEFAULT 0,
                resumed_by TEXT,
                new_job_id TEXT,
                meta TEXT NOT NULL DEFAULT '{{}}'
            )""",
            "INSERT INTO checkpoints_v2 SELECT * FROM checkpoints",
            "DELETE FROM sqlite_sequence WHERE name = 'checkpoints_v2'",
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'checkpoints_v2', seq FROM sqlite_sequence "
            "WHERE name = 'checkpoints'",
            "DROP TABLE checkpoints",
            "ALTER TABLE checkpoints_v2 RENAME TO checkpoints",
            "CREATE INDEX checkpoints_job_latest ON checkpoints (job_id, status, ckptid)",
            "CREATE INDEX checkpoints_uid ON checkpoints (uid, ckptid)",
        ],
    ),
    (3, [_lease_table("INTEGER", "REAL")]),
]

POSTGRES_MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            f"""CREATE TABLE checkpoints (
                ckptid BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY CHECK (ckptid > 0),
                job_id TEXT NOT NULL,
                step TEXT,
                array_job_id TEXT,
                array_task_id TEXT,
                uid BIGINT NOT NULL,
                "user" TEXT NOT NULL,
                node TEXT NOT NULL DEFAULT '',
                path TEXT NOT NULL DEFAULT '',
                size_bytes BIGINT NOT NULL DEFAULT 0,
                engine TEXT NOT NULL,
                status TEXT NOT NULL CHECK ({_STATUS_CHECK}),
                parent BIGINT,
                created DOUBLE PRECISION NOT NULL,
                finished DOUBLE PRECISION,
                duration DOUBLE PRECISION,
                error TEXT NOT NULL DEFAULT '',
                requeue_count INTEGER NOT NULL DEFAULT 0,
                resumed_by TEXT,
                new_job_id TEXT,
                meta TEXT NOT NULL DEFAULT '{{}}'
            )""",
            "CREATE INDEX checkpoints_job_latest ON checkpoints (job_id, status, ckptid)",
            "CREATE INDEX checkpoints_uid ON checkpoints (uid, ckptid)",
            """CREATE TABLE job_events (
                id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                job_id TEXT NOT NULL,
                uid BIGINT NOT NULL,
                event TEXT NOT NULL,
                detail TEXT NOT NULL DEFAULT '',
                node TEXT NOT NULL DEFAULT '',
                ts DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX job_events_job ON job_events (job_id, id)",
        ],
    ),
    (
        2,
        [
            "ALTER TABLE checkpoints DROP CONSTRAINT IF EXISTS checkpoints_status_check",
            f"ALTER TABLE checkpoints ADD CONSTRAINT checkpoints_status_check CHECK ({_STATUS_CHECK_2})",
        ],
    ),
    (3, [_lease_table("BIGINT", "DOUBLE PRECISION")]),
]
