"""The collective save and restore of an application-assisted checkpoint.

Save is a two-phase commit:

1. rank 0 opens the catalog row (``store.publish`` calls ``cat.begin``) and
   broadcasts the ckptid and the job directory;
2. every rank writes its own shard, in parallel, under a temp name, fsynced,
   and votes (its shard's digest, or its error);
3. rank 0 gathers the votes. Only if every rank succeeded does it rename the
   shards into place, fsync the directory, write the manifest and let
   ``publish`` rename it and commit the row; otherwise the row is marked
   failed and the temp shards removed;
4. rank 0 broadcasts the outcome, so every rank returns the same ckptid or
   raises the same MPIError.

A rank that dies anywhere in this leaves the row ``writing`` or ``failed``,
never ``committed``: the previous checkpoint stays the latest. (MPI then
aborts the job; gc removes the leftovers.)

Restore: rank 0 walks the committed checkpoints newest first and broadcasts a
manifest; every rank verifies and loads its own shard; the ranks agree that
all loads succeeded before anyone puts files back or returns, falling back to
the next older checkpoint otherwise.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.app import shards
from hpcckpt.app.coord import Coordinator
from hpcckpt.errors import HpcckptError, MPIError
from hpcckpt.fs import safe as fsutil
from hpcckpt.image import ImageMeta

_log = hlog.get("app")


@dataclass
class SaveOptions:
    staging: str | None = None
    codec: str = "none"
    level: int = 3
    chunk_size: int = 4 << 20


@dataclass
class Rank0:
    """What only rank 0 holds: the store and catalog (None on other ranks)."""

    store: Any
    catalog: Any
    begin_kwargs: dict[str, Any] = field(default_factory=dict)


def _error_text(err: BaseException) -> str:
    return err.render() if isinstance(err, HpcckptError) else f"{type(err).__name__}: {err}"


def save(
    coord: Coordinator,
    rank0: Rank0 | None,
    meta: ImageMeta,
    state: Any,
    files: Sequence[str | os.PathLike[str]],
    opts: SaveOptions,
) -> int:
    """Collective: every rank calls it with its own state. Returns the committed ckptid."""
    if coord.rank == 0:
        if rank0 is None:
            raise MPIError("internal: rank 0 has no store")
        outcome = _save_rank0(coord, rank0, meta, state, files, opts)
    else:
        outcome = _save_other(coord, meta, state, files, opts)
    kind, value = outcome
    if kind != "ok":
        raise MPIError(
            f"checkpoint not committed: {value}",
            hint="the previous checkpoint is still the latest; fix the cause and save again",
        )
    return int(value)


def _write_vote(
    coord: Coordinator, job_dir: Path, ckptid: int, meta: ImageMeta, state: Any,
    files: Sequence[str | os.PathLike[str]], opts: SaveOptions,
) -> tuple[str, str, str, int]:
    """Write this rank's shard; return its vote: ("ok", temp name, digest, size) or ("fail", error, "", 0)."""
    final = shards.shard_name(ckptid, coord.rank)
    shard_meta = replace(
        meta, ckptid=ckptid, extra={**meta.extra, "kind": "shard", "rank": coord.rank, "size": coord.size}
    )
    try:
        tmp, stats = shards.write_shard(
            job_dir, final, shard_meta, state, files,
            staging=opts.staging, codec=opts.codec, level=opts.level, chunk_size=opts.chunk_size,
        )
    except Exception as err:  # any failure must still be voted, or the other ranks wait forever
        return ("fail", f"rank {coord.rank}: {_error_text(err)}", "", 0)
    return ("ok", tmp, stats.digest, stats.bytes_out)


def _save_other(
    coord: Coordinator, meta: ImageMeta, state: Any, files: Sequence[str | os.PathLike[str]],
    opts: SaveOptions,
) -> tuple[str, Any]:
    kind, ckptid, job_dir = coord.bcast(("", 0, ""))
    if kind != "begin":
        return ("fail", job_dir)  # rank 0 could not open the row; job_dir holds its error
    vote = _write_vote(coord, Path(job_dir), ckptid, meta, state, files, opts)
    coord.gather(vote)
    outcome: tuple[str, Any] = coord.bcast(("", 0))
    if outcome[0] != "ok" and vote[0] == "ok":
        with contextlib.suppress(OSError):
            os.unlink(Path(job_dir) / vote[1])
    return outcome


def _save_rank0(
    coord: Coordinator, r0: Rank0, meta: ImageMeta, state: Any, files: Sequence[str | os.PathLike[str]],
    opts: SaveOptions,
) -> tuple[str, Any]:
    t0 = time.monotonic()
    announced = False
    votes: list[tuple[str, str, str, int]] = []
    renamed: list[Path] = []
    job_dir = Path()
    ckptid = 0
    try:
        with r0.store.publish(r0.catalog, **r0.begin_kwargs) as pub:
            ckptid = int(pub.ckptid)
            job_dir = Path(pub.path).parent
            coord.bcast(("begin", ckptid, str(job_dir)))
            announced = True
            mine = _write_vote(coord, job_dir, ckptid, meta, state, files, opts)
            votes = coord.gather(mine) or []
            failed = [v[1] for v in votes if v[0] != "ok"]
            if failed:
                raise MPIError("; ".join(failed))
            refs = []
            for rank, (_, tmp, digest, size) in enumerate(votes):
                final = job_dir / shards.shard_name(ckptid, rank)
                os.rename(job_dir / tmp, final)
                renamed.append(final)
                refs.append(shards.ShardRef(rank, final.name, digest, size))
            fsutil.fsync_dir(job_dir)
            manifest = shards.Manifest(ckptid, meta.job_id, coord.size, time.time(), tuple(refs))
            manifest_meta = replace(
                meta, ckptid=ckptid, extra={**meta.extra, "kind": "manifest", "size": coord.size}
            )
            shards.write_manifest(pub.file, manifest, manifest_meta, staging=opts.staging)
        # Leaving the block committed the row (publish: fsync, rename, fsync dir, commit).
    except Exception as err:
        text = _error_text(err)
        if not announced:
            coord.bcast(("abort", 0, text))
            return ("fail", text)
        for path in renamed:
            with contextlib.suppress(OSError):
                path.unlink()
        for v in votes:
            if v[0] == "ok":
                with contextlib.suppress(OSError):
                    os.unlink(job_dir / v[1])
        hlog.event(_log, "app.save_failed", f"checkpoint {ckptid} not committed: {text}", 30, ckptid=ckptid)
        outcome: tuple[str, Any] = ("fail", text)
        coord.bcast(outcome)
        return outcome
    total = sum(v[3] for v in votes)
    hlog.event(
        _log, "app.saved", f"checkpoint {ckptid} committed", ckptid=ckptid, ranks=coord.size,
        bytes=total, seconds=round(time.monotonic() - t0, 3),
    )
    coord.bcast(("ok", ckptid))
    return ("ok", ckptid)


@dataclass
class RestoredShards:
    ckptid: int
    manifest: shards.Manifest
    state: Any
    files: list[str]


ResizeLoader = Callable[[int], Any]


def restore(
    coord: Coordinator,
    candidates: Callable[[], list[Any]] | None,
    *,
    staging: str | None,
    allow_resize: bool,
    on_resize: Callable[[shards.Manifest, Path], Any] | None = None,
) -> RestoredShards | None:
    """Collective. ``candidates`` (rank 0 only) lists committed catalog records, newest first.

    Returns None on a fresh start. When the rank count differs and
    ``allow_resize`` is set, ``on_resize(manifest, manifest_path)`` builds the
    state on every rank instead of the per-rank load.
    """
    records: list[Any] = []
    listing_error = ""
    if coord.rank == 0 and candidates is not None:
        try:
            records = candidates()
        except HpcckptError as err:
            listing_error = err.render()
    tries = coord.bcast((len(records), listing_error))
    if tries[1]:
        raise MPIError(f"cannot list checkpoints: {tries[1]}")
    errors: list[str] = []
    for i in range(tries[0]):
        found: tuple[str, Any, str] = ("", None, "")
        if coord.rank == 0:
            rec = records[i]
            try:
                found = ("ok", shards.read_manifest(Path(rec.path), staging=staging), str(rec.path))
            except HpcckptError as err:
                found = ("bad", None, f"checkpoint {rec.ckptid}: {err.render()}")
        kind, manifest, where = coord.bcast(found)
        if kind != "ok":
            errors.append(where)
            _warn_fallback(coord, where)
            continue
        assert isinstance(manifest, shards.Manifest)
        mpath = Path(where)
        if manifest.ranks != coord.size:
            if not allow_resize:
                raise MPIError(
                    f"checkpoint {manifest.ckptid} of job {manifest.job_id} was taken with "
                    f"{manifest.ranks} ranks, this run has {coord.size}",
                    hint=f"restart with {manifest.ranks} ranks, or let the application redistribute "
                    "its state: Checkpointer.restore(allow_resize=True) or restore(reshard=...)",
                )
            assert on_resize is not None
            value: Any = None
            ok, why = True, ""
            try:
                value = on_resize(manifest, mpath)
            except HpcckptError as err:
                ok, why = False, f"rank {coord.rank}: {err.render()}"
            if coord.all_true(ok):
                return RestoredShards(manifest.ckptid, manifest, value, [])
            errors.append(why or f"checkpoint {manifest.ckptid}: another rank failed to reshard")
            continue
        result = _load_own_shard(coord, manifest, mpath, staging)
        if result is not None:
            return result
        errors.append(f"checkpoint {manifest.ckptid}: a shard failed verification")
    if errors:
        raise MPIError(
            "no usable checkpoint: " + " | ".join(errors),
            hint="every committed checkpoint of this job failed verification; see 'hpcckpt verify'",
        )
    return None


def _warn_fallback(coord: Coordinator, why: str) -> None:
    if coord.rank == 0:
        hlog.event(_log, "app.restore_fallback", f"skipping {why}; trying an older checkpoint", 30)


def _load_own_shard(
    coord: Coordinator, manifest: shards.Manifest, mpath: Path, staging: str | None
) -> RestoredShards | None:
    ref = manifest.shards[coord.rank]
    with shards.staging_dir(staging) as stage:
        value: Any = None
        captured: list[shards.CapturedFile] = []
        why = ""
        try:
            value, captured = shards.load_shard(shards.shard_path(mpath, ref), ref, manifest.ranks, stage / "s")
        except HpcckptError as err:
            why = err.render()
            hlog.event(_log, "app.shard_bad", f"rank {coord.rank}: {why}", 30, ckptid=manifest.ckptid)
        # Nobody puts files back or returns until every rank has a good shard:
        # otherwise ranks would resume from different checkpoints.
        if not coord.all_true(not why):
            _warn_fallback(coord, f"checkpoint {manifest.ckptid}")
            return None
        restored = shards.put_back(captured)
    return RestoredShards(manifest.ckptid, manifest, value, restored)
