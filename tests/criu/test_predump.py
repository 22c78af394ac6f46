"""Pre-dump with memory tracking, through the CriuCheckpointer, with a fake engine injected.

This kernel has no soft-dirty tracking, so real CRIU refuses ``pre-dump
--track-mem`` here (tests/criu/test_chain_restart.py checks that the probe
says so). These tests cover the logic around it: the pre-dump becomes the
dump's ``parent/`` directory inside the image, any failure falls back to a
plain dump without losing the checkpoint, and such an image is unpacked,
not streamed, on restore.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcckpt.core.checkpoint import CriuCheckpointer
from hpcckpt.core.pipeline.predump import PreDumpEngine, PreDumpPlan
from hpcckpt.core.resume import header_facts
from hpcckpt.criu.interface import DumpOptions, DumpResult
from hpcckpt.errors import EngineError
from hpcckpt.image import unpack_image, verify_image
from tests.criu.test_units import FileEngine, make

MEMORY = os.urandom(64 << 10)


class PreDumping(FileEngine):
    """CRIU's pre-dump/dump pair as files: the pre-dump holds the memory, the dump what changed."""

    def __init__(self, *, fail_predump: bool = False, fail_tracked: bool = False) -> None:
        self.fail_predump, self.fail_tracked = fail_predump, fail_tracked
        self.calls: list[str] = []

    def pre_dump(self, pid: int, images_dir: Path, *, options: DumpOptions, timeout: float | None = None
                 ) -> DumpResult:
        self.calls.append("pre-dump")
        (images_dir / "pages-1.img").write_bytes(MEMORY)
        (images_dir / "predump.log").write_text("log")
        if self.fail_predump:
            raise EngineError("criu pre-dump of pid 1 failed (exit 1)", log_excerpt="Tracking memory is not available")
        return DumpResult(0.001, images_dir / "predump.log", images_dir)

    def dump(self, pid: int, images_dir: Path, *, options: DumpOptions, after: str = "running",
             timeout: float | None = None, track_from: Path | None = None) -> DumpResult:
        self.calls.append("tracked dump" if track_from else "dump")
        if track_from is not None:
            (images_dir / "pages-1.img").write_bytes(b"changed")
            os.symlink(os.path.relpath(track_from, images_dir), images_dir / "parent")
            if self.fail_tracked:
                raise EngineError("criu dump of pid 1 failed (exit 1)", log_excerpt="Error (mem.c:1): parent")
        else:
            (images_dir / "pages-1.img").write_bytes(MEMORY)
        return DumpResult(0.001, images_dir / "dump.log", images_dir)


def with_predump(tmp_path: Path, engine: PreDumping) -> CriuCheckpointer:
    ck = make(tmp_path, engine)
    ck.predump = PreDumpPlan(True, "criu check --feature mem_dirty_track: available")
    return ck


def test_the_predump_becomes_the_images_parent_directory(tmp_path: Path) -> None:
    engine = PreDumping()
    assert isinstance(engine, PreDumpEngine)
    ck = with_predump(tmp_path, engine)
    res = ck.checkpoint(os.getpid())
    assert engine.calls == ["pre-dump", "tracked dump"]
    summary = verify_image(res.path)
    assert summary.meta.extra["predump"] is True and header_facts(res.path).predumped
    out = tmp_path / "out"
    unpack_image(res.path, out)
    # a real directory where CRIU left its link: CRIU opens either as the parent images
    assert (out / "parent").is_dir() and not (out / "parent").is_symlink()
    assert (out / "parent" / "pages-1.img").read_bytes() == MEMORY
    assert (out / "pages-1.img").read_bytes() == b"changed"
    assert not (out / "parent" / "predump.log").exists()
    assert ck.predump.enabled
    ck.checkpoint(os.getpid())
    assert engine.calls[2:] == ["pre-dump", "tracked dump"]


def test_a_final_checkpoint_does_not_predump(tmp_path: Path) -> None:
    engine = PreDumping()
    ck = with_predump(tmp_path, engine)
    taken = ck.stage(os.getpid(), final=False)
    taken.staged.remove()
    assert engine.calls == ["pre-dump", "tracked dump"]
    engine.calls.clear()
    taken = ck.stage(os.getpid(), final=True)  # (a fake engine: nothing is stopped)
    taken.staged.remove()
    assert engine.calls == ["dump"] and ck.predump.enabled


@pytest.mark.parametrize("fail", ["predump", "tracked"])
def test_a_failing_predump_falls_back_to_a_plain_dump_and_stays_off(tmp_path: Path, fail: str) -> None:
    engine = PreDumping(fail_predump=fail == "predump", fail_tracked=fail == "tracked")
    ck = with_predump(tmp_path, engine)
    res = ck.checkpoint(os.getpid())  # the checkpoint is not lost
    first = ["pre-dump", "dump"] if fail == "predump" else ["pre-dump", "tracked dump", "dump"]
    assert engine.calls == first
    assert not ck.predump.enabled and "failed" in ck.predump.reason
    out = tmp_path / "out"
    unpack_image(res.path, out)
    assert sorted(os.listdir(out)) == ["pages-1.img"] and (out / "pages-1.img").read_bytes() == MEMORY
    assert "predump" not in verify_image(res.path).meta.extra and not header_facts(res.path).predumped
    ck.checkpoint(os.getpid())
    assert engine.calls[len(first):] == ["dump"]
    assert ck.catalog.latest("unit") is not None


def test_an_engine_without_predump_never_gets_one(tmp_path: Path) -> None:
    ck = make(tmp_path, FileEngine())
    ck2 = CriuCheckpointer(engine=FileEngine(), store=ck.store, catalog=ck.catalog, job=ck.job, options=DumpOptions(),
                       flush=ck.settings, publisher=ck.publisher, disk_staging=tmp_path / "stage", tmpfs=None,
                       predump=PreDumpPlan(True, "available"))
    assert not ck2.predump.enabled and "no pre-dump" in ck2.predump.reason
    ck2.checkpoint(os.getpid())
