"""What a catalog row is: one checkpoint, its state and its lineage."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    WRITING = "writing"  # begun; the image is not durable yet, no reader takes it
    COMMITTED = "committed"  # durable on disk and valid: a resume may use it
    FAILED = "failed"  # the writer failed or died; its file, if any, is garbage
    DELETED = "deleted"  # removed by retention or gc; the row stays as history
    CORRUPT = "corrupt"  # committed once, then found damaged or not the image its row names; never restored

    def __str__(self) -> str:
        return self.value


# Column order shared by both backends; the SQL and the dataclass follow it.
COLUMNS: tuple[str, ...] = (
    "ckptid",
    "job_id",
    "step",
    "array_job_id",
    "array_task_id",
    "uid",
    "user",
    "node",
    "path",
    "size_bytes",
    "engine",
    "status",
    "parent",
    "created",
    "finished",
    "duration",
    "error",
    "requeue_count",
    "resumed_by",
    "new_job_id",
    "meta",
)


@dataclass
class CkptRecord:
    ckptid: int
    job_id: str
    step: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    uid: int = 0
    user: str = ""
    node: str = ""
    path: str = ""
    size_bytes: int = 0
    engine: str = ""
    status: Status = Status.WRITING
    parent: int | None = None
    created: float = 0.0
    finished: float | None = None
    duration: float | None = None
    error: str = ""
    requeue_count: int = 0
    resumed_by: str | None = None
    new_job_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> CkptRecord:
        values = dict(zip(COLUMNS, row, strict=True))
        meta_raw = values.pop("meta") or "{}"
        meta = meta_raw if isinstance(meta_raw, dict) else json.loads(meta_raw)
        values["status"] = Status(values["status"])
        return cls(meta=meta, **values)

    def to_row(self) -> tuple[Any, ...]:
        doc = asdict(self)
        doc["status"] = Status(self.status).value
        doc["meta"] = json.dumps(self.meta, sort_keys=True, default=str)
        return tuple(doc[c] for c in COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["status"] = Status(self.status).value
        return doc


class LeaseState(str, Enum):
    LIVE = "live"  # a runner holds the job (it may have died since: see hpcckpt.core.lease.judge)
    STOPPED = "stopped"  # the last runner let go without the job ending (checkpoint-and-stop, failure)
    EXITED = "exited"  # the job ended on its own, with exit_status at ended

    def __str__(self) -> str:
        return self.value


LEASE_COLUMNS: tuple[str, ...] = (
    "uid",
    "job_id",
    "user",
    "token",
    "state",
    "node",
    "host",
    "boot_id",
    "pid",
    "pid_start",
    "slurm_job_id",
    "slurm_step",
    "restart_count",
    "acquired",
    "renewed",
    "expires",
    "ended",
    "exit_status",
    "options",
)


@dataclass
class LeaseRecord:
    """One job's lease row: who runs it (or ran it last), until when, and how its last run ended."""

    uid: int
    job_id: str
    user: str = ""
    token: str = ""
    state: LeaseState = LeaseState.LIVE
    node: str = ""  # the scheduler's name of the node (several Slurm nodes may share a host)
    host: str = ""  # the kernel's hostname: where the pid means something
    boot_id: str = ""  # and in which boot of it
    pid: int = 0  # the runner's pid
    pid_start: int = 0  # its start time in clock ticks since boot (/proc/PID/stat field 22)
    slurm_job_id: str | None = None
    slurm_step: str | None = None
    restart_count: int = 0  # SLURM_RESTART_COUNT of the holder
    acquired: float = 0.0
    renewed: float = 0.0
    expires: float = 0.0
    ended: float | None = None
    exit_status: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> LeaseRecord:
        values = dict(zip(LEASE_COLUMNS, row, strict=True))
        raw = values.pop("options") or "{}"
        options = raw if isinstance(raw, dict) else json.loads(raw)
        values["state"] = LeaseState(values["state"])
        for key in ("uid", "pid", "pid_start", "restart_count"):
            values[key] = int(values[key])
        return cls(options=options, **values)

    def to_row(self) -> tuple[Any, ...]:
        doc = asdict(self)
        doc["state"] = LeaseState(self.state).value
        doc["options"] = json.dumps(self.options, sort_keys=True, default=str)
        return tuple(doc[c] for c in LEASE_COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["state"] = LeaseState(self.state).value
        return doc
