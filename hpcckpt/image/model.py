"""The image's data classes, and their strict JSON (de)serialization.

The JSON inside header, tasks and files records has passed its checksum, but
a checksum is not a signature: a hostile or buggy writer can produce any
JSON. So decoding checks every field's type and refuses what does not fit,
raising :class:`FieldError`, which the reader turns into a located
CorruptImageError.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcckpt.image.refs import ParentIndex


class FieldError(ValueError):
    """A decoded JSON value has the wrong shape (the reader adds the location)."""


@dataclass
class ImageMeta:
    """The job metadata in the image header."""

    ckptid: int
    job_id: str
    engine: str  # "criu" | "app" | "files"
    engine_version: str = ""
    parent_ckptid: int | None = None
    step: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    slurm: dict[str, str] = field(default_factory=dict)
    uid: int = 0
    gid: int = 0
    user: str = ""
    node: str = ""
    cmdline: list[str] = field(default_factory=list)
    cwd: str = ""
    policy_digest: str = ""
    requeue_count: int = 0
    created: float = 0.0
    flags: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TaskInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    comm: str
    cmdline: list[str]
    uid: int = -1
    gid: int = -1


@dataclass
class OpenFile:
    pid: int
    fd: int
    path: str
    size: int
    mtime_ns: int
    mode: str  # "r", "w", "rw", "a"
    inode: int = 0
    dev: int = 0


@dataclass
class SectionInfo:
    name: str
    mode: int  # st_mode, file type bits included
    size: int  # raw bytes
    stored: int  # bytes in the image (after compression)
    codec: str  # the codec asked for; incompressible chunks are stored raw anyway
    kind: str = "file"  # "file" | "dir"
    chunks: int = 0

    @property
    def ratio(self) -> float:
        """Raw size over stored size (1.0 when nothing was stored)."""
        return self.size / self.stored if self.stored else 1.0


@dataclass
class PackStats:
    bytes_out: int
    bytes_in: int
    records: int
    digest: str
    sections: int
    refs: int = 0  # chunks stored as references to a parent image
    ref_bytes: int = 0  # raw bytes those references stand for
    # The new image's own index, to pack the next checkpoint against without reading this one back.
    index: ParentIndex | None = None


@dataclass
class ImageSummary:
    meta: ImageMeta
    header: dict[str, Any]
    tasks: list[TaskInfo]
    files: list[OpenFile]
    sections: list[SectionInfo]
    errors: list[str]
    records: int
    length: int
    digest: str
    parents: list[int] = field(default_factory=list)  # images this incremental one refers to
    ref_bytes: int = 0  # raw bytes taken from them
    parents_verified: bool = True  # False: verified without resolve_parent, parents unchecked

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta.to_dict(),
            "header": dict(self.header),
            "tasks": [asdict(t) for t in self.tasks],
            "files": [asdict(f) for f in self.files],
            "sections": [dict(asdict(s), ratio=round(s.ratio, 3)) for s in self.sections],
            "errors": list(self.errors),
            "records": self.records,
            "length": self.length,
            "digest": self.digest,
            "parents": list(self.parents),
            "ref_bytes": self.ref_bytes,
            "parents_verified": self.parents_verified,
        }


# --- strict decoding -------------------------------------------------------


def _check(value: Any, kind: str, name: str) -> Any:
    # bool is an int subclass; a JSON true where a number belongs is still wrong
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "int?": value is None or (isinstance(value, int) and not isinstance(value, bool)),
        "str?": value is None or isinstance(value, str),
        "strlist": isinstance(value, list) and all(isinstance(x, str) for x in value),
        "strdict": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
        "dict": isinstance(value, dict),
    }[kind]
    if not ok:
        raise FieldError(f"field {name!r} should be {kind}, got {type(value).__name__}")
    return float(value) if kind == "float" else value


_META_KINDS = {
    "ckptid": "int",
    "job_id": "str",
    "engine": "str",
    "engine_version": "str",
    "parent_ckptid": "int?",
    "step": "str?",
    "array_job_id": "str?",
    "array_task_id": "str?",
    "slurm": "strdict",
    "uid": "int",
    "gid": "int",
    "user": "str",
    "node": "str",
    "cmdline": "strlist",
    "cwd": "str",
    "policy_digest": "str",
    "requeue_count": "int",
    "created": "float",
    "flags": "int",
    "extra": "dict",
}
_TASK_KINDS = {
    "pid": "int",
    "ppid": "int",
    "pgid": "int",
    "sid": "int",
    "comm": "str",
    "cmdline": "strlist",
    "uid": "int",
    "gid": "int",
}
_FILE_KINDS = {
    "pid": "int",
    "fd": "int",
    "path": "str",
    "size": "int",
    "mtime_ns": "int",
    "mode": "str",
    "inode": "int",
    "dev": "int",
}
assert set(_META_KINDS) == {f.name for f in fields(ImageMeta)}
assert set(_TASK_KINDS) == {f.name for f in fields(TaskInfo)}
assert set(_FILE_KINDS) == {f.name for f in fields(OpenFile)}

def _required(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)


_REQUIRED = {"meta": _required(ImageMeta), "task": _required(TaskInfo), "file": _required(OpenFile)}


def _decode(doc: Any, kinds: dict[str, str], what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise FieldError(f"{what} should be a JSON object, got {type(doc).__name__}")
    out: dict[str, Any] = {}
    for name, kind in kinds.items():
        if name in doc:
            out[name] = _check(doc[name], kind, f"{what}.{name}")
        elif name in _REQUIRED[what]:
            raise FieldError(f"{what} lacks the field {name!r}")
    # Unknown keys come from a newer minor version and are ignored on purpose.
    return out


def meta_from_json(doc: Any) -> ImageMeta:
    return ImageMeta(**_decode(doc, _META_KINDS, "meta"))


def tasks_from_json(doc: Any) -> list[TaskInfo]:
    if not isinstance(doc, list):
        raise FieldError("tasks record should hold a JSON list")
    return [TaskInfo(**_decode(d, _TASK_KINDS, "task")) for d in doc]


def files_from_json(doc: Any) -> list[OpenFile]:
    if not isinstance(doc, list):
        raise FieldError("files record should hold a JSON list")
    return [OpenFile(**_decode(d, _FILE_KINDS, "file")) for d in doc]


def to_json_list(items: list[TaskInfo] | list[OpenFile]) -> list[dict[str, Any]]:
    return [asdict(i) for i in items]
