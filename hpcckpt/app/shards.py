"""On-disk layout of an application-assisted checkpoint: one shard per rank, one manifest.

In the job's store directory ``ROOT/USER/<job>/``::

    ckpt-<ckptid>.hck           the manifest image (the catalog row's path)
    ckpt-<ckptid>.r<rank>.hck   one shard image per rank

Every file is an hpcckpt image (docs/format.md) with ``engine = "app"``.

A shard image packs a directory::

    state.hst       the rank's state (hpcckpt.app.state encoding)
    files.json      [{"index", "path", "mode", "size", "mtime_ns"}, ...] captured files
    files/<index>   their contents

Its header's ``extra`` holds ``{"kind": "shard", "rank": r, "size": n}``.

The manifest image packs ``manifest.json``::

    {"format": "hpcckpt-app-manifest", "version": 1, "ckptid": ..., "job_id": ...,
     "ranks": n, "created": unix time,
     "shards": [{"rank": r, "name": "ckpt-<id>.r<r>.hck", "digest": hex, "size": bytes}, ...]}

``digest`` is the shard image's own digest (ImageSummary.digest), so a shard
swapped for another rank's or another checkpoint's is caught, not only a
damaged one. A checkpoint exists only once its manifest is committed in the
catalog; shards without a committed manifest are garbage.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hpcckpt.app import state as state_codec
from hpcckpt.errors import StoreError, UsageError
from hpcckpt.fs import safe as fsutil
from hpcckpt.image import ImageMeta, PackStats, pack_dir, unpack_image
from hpcckpt.image.errors import CorruptImageError

MANIFEST_FORMAT = "hpcckpt-app-manifest"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.hst"
FILES_INDEX = "files.json"
FILES_DIR = "files"
SHARD_PATTERN = "ckpt-{ckptid}.r{rank}.hck"
_SHARD_NAME = re.compile(r"ckpt-([1-9][0-9]*)\.r(0|[1-9][0-9]*)\.hck")


def shard_name(ckptid: int, rank: int) -> str:
    return SHARD_PATTERN.format(ckptid=ckptid, rank=rank)


@dataclass(frozen=True)
class ShardRef:
    rank: int
    name: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    ckptid: int
    job_id: str
    ranks: int
    created: float
    shards: tuple[ShardRef, ...]

    def to_json(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "ckptid": self.ckptid,
            "job_id": self.job_id,
            "ranks": self.ranks,
            "created": self.created,
            "shards": [
                {"rank": s.rank, "name": s.name, "digest": s.digest, "size": s.size} for s in self.shards
            ],
        }
        return json.dumps(doc, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        def bad(msg: str) -> CorruptImageError:
            return CorruptImageError(f"{MANIFEST_FILE}: {msg}", path=where)

        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad(f"not JSON: {err}") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise bad("not an hpcckpt application checkpoint manifest")
        if doc.get("version") != MANIFEST_VERSION:
            raise bad(f"manifest version {doc.get('version')!r} is not supported (this hpcckpt reads 1)")
        ckptid, ranks, job_id = doc.get("ckptid"), doc.get("ranks"), doc.get("job_id")
        if type(ckptid) is not int or ckptid <= 0 or type(ranks) is not int or ranks <= 0:
            raise bad("ckptid and ranks must be positive integers")
        if not isinstance(job_id, str) or not isinstance(doc.get("created"), (int, float)):
            raise bad("job_id must be a string and created a number")
        raw_shards = doc.get("shards")
        if not isinstance(raw_shards, list) or len(raw_shards) != ranks:
            raise bad(f"expected {ranks} shards")
        shards = []
        for i, s in enumerate(raw_shards):
            if not isinstance(s, dict):
                raise bad(f"shard {i} is not an object")
            name, digest, size = s.get("name"), s.get("digest"), s.get("size")
            if s.get("rank") != i or name != shard_name(ckptid, i):
                raise bad(f"shard {i}: rank or name {name!r} does not match ckpt-{ckptid}.r{i}.hck")
            if not isinstance(digest, str) or not digest or type(size) is not int or size < 0:
                raise bad(f"shard {i}: bad digest or size")
            shards.append(ShardRef(i, name, digest, size))
        return cls(ckptid, job_id, ranks, float(doc["created"]), tuple(shards))


@dataclass(frozen=True)
class CapturedFile:
    path: str
    mode: int
    size: int
    mtime_ns: int
    stored: Path  # where its content lies in the unpacked shard


@contextlib.contextmanager
def staging_dir(base: str | None) -> Iterator[Path]:
    """A private scratch directory, removed afterwards (0700 by mkdtemp)."""
    if base:
        os.makedirs(base, mode=0o700, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="hpcckpt-app-", dir=base or None))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def capture_files(files: Sequence[str | os.PathLike[str]], dest: Path) -> None:
    index: list[dict[str, Any]] = []
    (dest / FILES_DIR).mkdir(mode=0o700)
    for i, name in enumerate(files):
        path = os.path.abspath(os.fspath(name))
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{path}: only regular files can be captured in a checkpoint")
            shutil.copyfile(path, dest / FILES_DIR / str(i))
        except OSError as err:
            raise UsageError(
                f"{path}: cannot capture it in the checkpoint: {err.strerror}",
                hint="pass files=[...] naming existing, readable regular files",
            ) from err
        index.append(
            {"index": i, "path": path, "mode": stat.S_IMODE(st.st_mode), "size": st.st_size,
             "mtime_ns": st.st_mtime_ns}
        )
    (dest / FILES_INDEX).write_text(json.dumps(index), encoding="utf-8")


def write_shard(
    job_dir: Path,
    final_name: str,
    meta: ImageMeta,
    state: Any,
    files: Sequence[str | os.PathLike[str]],
    *,
    staging: str | None,
    codec: str,
    level: int,
    chunk_size: int,
) -> tuple[str, PackStats]:
    """Write one rank's shard under a temp name in ``job_dir``, fsynced; return (temp name, stats).

    The caller renames it to ``final_name`` once every rank has succeeded.
    """
    with staging_dir(staging) as stage:
        state_codec.write_file(state, stage / STATE_FILE)
        capture_files(files, stage)
        tmp = fsutil.temp_name(final_name)
        dir_fd = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd = fsutil.open_private_file_at(dir_fd, tmp, os.geteuid(), os.getegid())
            try:
                with os.fdopen(fd, "wb") as out:
                    stats = pack_dir(stage, out, meta, codec=codec, level=level, chunk_size=chunk_size)
                    out.flush()
                    os.fsync(out.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
        finally:
            os.close(dir_fd)
    return tmp, stats


def write_manifest(out: BinaryIO, manifest: Manifest, meta: ImageMeta, *, staging: str | None) -> PackStats:
    with staging_dir(staging) as stage:
        fd = os.open(stage / MANIFEST_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(manifest.to_json())
        return pack_dir(stage, out, meta)


def read_manifest(path: Path, *, staging: str | None) -> Manifest:
    with staging_dir(staging) as stage:
        summary = unpack_image(path, stage / "m")
        if summary.meta.engine != "app" or summary.meta.extra.get("kind") != "manifest":
            raise CorruptImageError(
                f"not an application checkpoint manifest (engine {summary.meta.engine!r})",
                path=str(path),
                hint="this checkpoint was taken by another engine; resume it with 'hpcckpt resume'",
            )
        try:
            data = (stage / "m" / MANIFEST_FILE).read_bytes()
        except FileNotFoundError:
            raise CorruptImageError(f"{MANIFEST_FILE} is missing", path=str(path)) from None
        manifest = Manifest.from_json(data, str(path))
    if manifest.ckptid != summary.meta.ckptid:
        raise CorruptImageError(
            f"manifest says ckptid {manifest.ckptid}, image header says {summary.meta.ckptid}", path=str(path)
        )
    return manifest


def shard_path(manifest_path: Path, ref: ShardRef) -> Path:
    # from_json already matched the name against the pattern; checked again
    # here because this is the one place a name becomes a path.
    if not _SHARD_NAME.fullmatch(ref.name):
        raise CorruptImageError(f"unsafe shard name {ref.name!r}", path=str(manifest_path))
    return manifest_path.parent / ref.name


def load_shard(path: Path, ref: ShardRef, size: int, dest: Path) -> tuple[Any, list[CapturedFile]]:
    """Unpack and check one shard into ``dest`` (an empty staging dir); return its state and files."""
    summary = unpack_image(path, dest)
    where = str(path)
    if summary.digest != ref.digest:
        raise CorruptImageError(
            f"digest {summary.digest} does not match the manifest's {ref.digest}",
            path=where,
            hint="the shard was replaced or belongs to another checkpoint; restore from an older checkpoint",
        )
    extra = summary.meta.extra
    if extra.get("kind") != "shard" or extra.get("rank") != ref.rank or extra.get("size") != size:
        raise CorruptImageError(
            f"header says rank {extra.get('rank')!r} of {extra.get('size')!r}, expected {ref.rank} of {size}",
            path=where,
        )
    value = state_codec.read_file(dest / STATE_FILE)
    return value, read_files_index(dest, where)


def read_files_index(dest: Path, where: str) -> list[CapturedFile]:
    try:
        index = json.loads((dest / FILES_INDEX).read_bytes())
    except (OSError, ValueError) as err:
        raise CorruptImageError(f"{FILES_INDEX}: unreadable: {err}", path=where) from None
    out = []
    if not isinstance(index, list):
        raise CorruptImageError(f"{FILES_INDEX}: not a list", path=where)
    for i, doc in enumerate(index):
        ok = (
            isinstance(doc, dict)
            and doc.get("index") == i
            and isinstance(doc.get("path"), str)
            and os.path.isabs(doc["path"])
            and all(type(doc.get(k)) is int for k in ("mode", "size", "mtime_ns"))
        )
        stored = dest / FILES_DIR / str(i)
        if not ok or not stored.is_file() or stored.is_symlink():
            raise CorruptImageError(f"{FILES_INDEX}: entry {i} is malformed or its content is missing",
                                    path=where)
        out.append(CapturedFile(doc["path"], doc["mode"] & 0o7777, doc["size"], doc["mtime_ns"], stored))
    return out


def put_back(files: Sequence[CapturedFile]) -> list[str]:
    """Write captured files back to their paths, each atomically (temp file and rename).

    A rename replaces a symlink at the destination instead of writing
    through it, so a link planted where a restart file was is not followed.
    """
    restored = []
    for f in files:
        target = Path(f.path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / fsutil.temp_name(target.name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as out, open(f.stored, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                    os.fchmod(out.fileno(), f.mode)
                    out.flush()
                    os.fsync(out.fileno())
                os.utime(tmp, ns=(f.mtime_ns, f.mtime_ns), follow_symlinks=False)
                os.rename(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsutil.fsync_dir(target.parent)
        except OSError as err:
            raise StoreError(
                f"{target}: cannot put the checkpointed file back: {err.strerror}",
                hint="check that its directory exists and is writable",
            ) from err
        restored.append(str(target))
    return restored
