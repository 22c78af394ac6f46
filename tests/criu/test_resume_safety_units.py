"""Logic of a non-destructive resume, without CRIU: recorded paths, kept tails, header-row binding."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hpcckpt.core.resume import plan_paths
from hpcckpt.core.tails import Tails
from hpcckpt.criu.images import RecordedPath
from hpcckpt.errors import IncompatibleError, StoreError
from hpcckpt.image import OpenFile
from hpcckpt.image.errors import CorruptImageError
from hpcckpt.image.model import ImageMeta
from hpcckpt.store.binding import check_bound, row_mismatches
from hpcckpt.store.resolve import CkptRef

REG, DIR = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755


def test_plan_paths_names_every_missing_or_changed_path() -> None:
    now = {"/bin/prog": (stat.S_IFREG | 0o755, 10), "/lib/libx.so": (REG, 99), "/work": (stat.S_IFDIR | 0o700, 0),
           "/work/out": (REG, 500)}
    recorded = [
        RecordedPath("/bin/prog", stat.S_IFREG | 0o755, 10),  # as it was
        RecordedPath("/lib/libgone.so", REG, 5),  # removed
        RecordedPath("/lib/libx.so", REG, 100),  # another size
        RecordedPath("/work", DIR, None),  # cwd chmod'ed
        RecordedPath("/work/out", REG, 100),  # open for writing: plan_files sizes it, not this
        RecordedPath("/proc/self/status", REG, 0),  # reopened in the restored namespace
    ]
    opened = [OpenFile(pid=1, fd=3, path="/work/out", size=100, mtime_ns=0, mode="a")]
    problems = plan_paths(recorded, opened, lambda p: now.get(p))
    assert problems == [
        "/lib/libgone.so: no longer exists (the job's program, a library it mapped, its working directory or a "
        "file it had open)",
        "/lib/libx.so: its size is 99 now and was 100 at the checkpoint",
        "/work: its mode is 40700 now and was 40755 at the checkpoint",
    ]


def grown(tmp_path: Path, name: str, head: bytes, tail: bytes) -> tuple[Path, os.stat_result]:
    p = tmp_path / name
    p.write_bytes(head + tail)
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    return p, p.stat()


def test_tails_are_kept_privately_and_put_back_byte_identical(tmp_path: Path) -> None:
    a, sa = grown(tmp_path, "a.txt", b"checkpointed\n", b"written after\n" * 1000)
    b, sb = grown(tmp_path, "b.txt", b"x" * 10, b"y" * 3)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (a, b)}
    tails = Tails(tmp_path / "staging" / "tails-1")
    (tmp_path / "staging").mkdir(mode=0o700)
    tails.cut(str(a), 13, sa.st_ino)
    tails.cut(str(b), 10, sb.st_ino)
    assert a.read_bytes() == b"checkpointed\n" and b.read_bytes() == b"x" * 10
    assert stat.S_IMODE(tails.root.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in tails.root.iterdir()} == {0o600}
    manifest = json.loads((tails.root / "tails.json").read_text())
    assert [(m["path"], m["size"], m["length"]) for m in manifest] == [(str(a), 13, 14000), (str(b), 10, 3)]
    tails.put_back()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (a, b)} == before
    assert not tails.root.exists()


def test_tails_are_dropped_once_the_restore_succeeded(tmp_path: Path) -> None:
    a, sa = grown(tmp_path, "a.txt", b"head", b"tail")
    tails = Tails(tmp_path / "tails")
    tails.cut(str(a), 4, sa.st_ino)
    tails.drop()
    assert a.read_bytes() == b"head" and not tails.root.exists()


def test_a_replaced_file_is_not_cut(tmp_path: Path) -> None:
    a, sa = grown(tmp_path, "a.txt", b"head", b"tail")
    with pytest.raises(IncompatibleError, match="replaced"):
        Tails(tmp_path / "tails").cut(str(a), 4, sa.st_ino + 1)
    assert a.read_bytes() == b"headtail"


def test_a_file_written_after_the_cut_keeps_its_tail_and_says_where(tmp_path: Path) -> None:
    a, sa = grown(tmp_path, "a.txt", b"head", b"tail")
    tails = Tails(tmp_path / "tails")
    tails.cut(str(a), 4, sa.st_ino)
    with open(a, "ab") as f:
        f.write(b"someone else")
    with pytest.raises(StoreError, match="kept in") as info:
        tails.put_back()
    kept = Path(tails.root / "tail-0")
    assert str(kept) in str(info.value) and kept.read_bytes() == b"tail"
    assert [m["path"] for m in json.loads((tails.root / "tails.json").read_text())] == [str(a)]


def meta(**kw: object) -> ImageMeta:
    base: dict[str, object] = {"ckptid": 14, "job_id": "J", "engine": "criu", "uid": 1000, "parent_ckptid": 13}
    base.update(kw)
    return ImageMeta(**base)  # type: ignore[arg-type]


def test_header_must_name_the_row_it_is_filed_under() -> None:
    row = CkptRef(ckptid=14, uid=1000, path="/s/J/ckpt-14.hck", status="committed", job_id="J", parent=13)
    assert row_mismatches(meta(), row) == []
    wrong = meta(ckptid=11, parent_ckptid=None)
    assert row_mismatches(wrong, row) == ["the header says checkpoint 11", "parent none (the catalog says 13)"]
    assert row_mismatches(meta(job_id="K", uid=0), row) == ["job 'K' (the catalog says 'J')",
                                                            "owner uid 0 (the catalog says 1000)"]
    with pytest.raises(CorruptImageError, match="is not checkpoint 14: the header says checkpoint 11") as info:
        check_bound(wrong, row, row.path)
    assert info.value.path == row.path and info.value.exit_code == 4
