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
