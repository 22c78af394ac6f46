"""Pack then unpack gives back the same tree, byte for byte, modes and times included."""

from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path

import pytest

from hpcckpt.errors import StoreError
from hpcckpt.image import (
    OpenFile,
    TaskInfo,
    pack_dir,
    read_header,
    unpack_image,
    verify_image,
    write_error_image,
)
from hpcckpt.image import format as F
from hpcckpt.image.errors import ImageError
from tests.image.conftest import make_tree, meta, pack_bytes


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None, int]]:
    out: dict[str, tuple[int, bytes | None, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            mtime = st.st_mtime_ns if stat.S_ISREG(st.st_mode) else 0
            out[str(p.relative_to(root))] = (st.st_mode, data, mtime)
    return out


@pytest.mark.parametrize("codec", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("chunk_size", [F.MIN_CHUNK, F.DEFAULT_CHUNK])
def test_roundtrip_identical(tree: Path, tmp_path: Path, codec: str, chunk_size: int) -> None:
    (tree / "big.img").write_bytes(os.urandom(20000) + b"z" * 30000)
    image = pack_bytes(tree, codec=codec, chunk_size=chunk_size)
    out = tmp_path / "out"
    summary = unpack_image(io.BytesIO(image), out)
    assert snapshot(out) == snapshot(tree)
    assert summary.length == len(image)
    assert {s.name for s in summary.sections} == set(snapshot(tree))


def test_identical_trees_give_identical_images(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a")
    m = meta(created=1700000000.0)
    assert pack_bytes(a, meta=m, codec="zstd") == pack_bytes(a, meta=m, codec="zstd")


def test_incompressible_chunks_are_stored_raw(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "random").write_bytes(os.urandom(100000))
    (src / "zeros").write_bytes(bytes(100000))
    s = verify_image(io.BytesIO(pack_bytes(src, codec="zstd", chunk_size=F.MIN_CHUNK)))
    by = {x.name: x for x in s.sections}
    assert by["random"].stored == 100000  # every chunk raw
    assert by["zeros"].stored < 2000 and by["zeros"].ratio > 50


def test_metadata_tasks_and_files_roundtrip(tree: Path) -> None:
    tasks = [TaskInfo(1, 0, 1, 1, "bash", ["bash", "-c", "x"], 1000, 1000), TaskInfo(2, 1, 1, 1, "sim", ["./sim"])]
    files = [OpenFile(2, 3, "/scratch/out.dat", 123, 456, "w", inode=9, dev=8)]
    m = meta(step="0", array_job_id="10", array_task_id="3", slurm={"SLURM_JOB_ID": "4242"},
             cmdline=["./sim", "ä ü"], parent_ckptid=6, extra={"criu": {"version": "4.2.1"}}, flags=0x10)
    s = verify_image(io.BytesIO(pack_bytes(tree, meta=m, tasks=tasks, files=files)))
    assert s.tasks == tasks and s.files == files
    assert s.meta.created > 0
    got = s.meta.to_dict()
    want = m.to_dict()
    del got["created"], want["created"]
    assert got == want
    assert s.header["kernel_release"] == os.uname().release and s.header["hostname"]
    assert s.header["format_version"] == f"{F.VERSION_MAJOR}.{F.VERSION_MINOR}"


def test_many_tasks_split_over_records(tree: Path) -> None:
    tasks = [TaskInfo(i, 1, 1, 1, "w", ["worker", "x" * 2000]) for i in range(2, 1200)]
    s = verify_image(io.BytesIO(pack_bytes(tree, tasks=tasks)))
    assert s.tasks == tasks


def test_read_header_is_cheap_and_matches(tree: Path, tmp_path: Path) -> None:
    path = tmp_path / "img.hck"
    path.write_bytes(pack_bytes(tree, meta=meta(ckptid=99, job_id="77")))
    h = read_header(path)
    assert (h.ckptid, h.job_id) == (99, "77")
    # read_header does not look at the rest: it works on a truncated image too
    path.write_bytes(path.read_bytes()[:2000])
    assert read_header(path).ckptid == 99


def test_error_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    stats = write_error_image(buf, meta(), "criu dump failed", "Error (criu/cr-dump.c:1): can't dump")
    s = verify_image(io.BytesIO(buf.getvalue()))
    assert stats.bytes_out == len(buf.getvalue()) == s.length
    assert s.errors == ["criu dump failed\nError (criu/cr-dump.c:1): can't dump"]
    assert s.header["flags"] & F.IF_ERROR
    with pytest.raises(ImageError, match="failed checkpoint"):
        unpack_image(io.BytesIO(buf.getvalue()), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streams_through_a_pipe(tree: Path, tmp_path: Path) -> None:
    r, w = os.pipe()

    def writer() -> None:
        with open(w, "wb") as f:
            pack_dir(tree, f, meta(), codec="lz4")

    t = threading.Thread(target=writer)
    t.start()
    with open(r, "rb") as f:
        unpack_image(f, tmp_path / "out")
    t.join()
    assert snapshot(tmp_path / "out") == snapshot(tree)


def test_pack_refuses_symlinks_and_fifos(tree: Path) -> None:
    (tree / "link").symlink_to("/etc/passwd")
    with pytest.raises(StoreError, match="symlink"):
        pack_bytes(tree)
    (tree / "link").unlink()
    os.mkfifo(tree / "fifo")
    with pytest.raises(StoreError, match="not a regular file"):
        pack_bytes(tree)


def test_pack_rejects_bad_arguments(tree: Path) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        pack_bytes(tree, chunk_size=100)
    with pytest.raises(ValueError, match="codec"):
        pack_bytes(tree, codec="gzip")
    with pytest.raises(StoreError, match="cannot open"):
        pack_bytes(tree / "missing")


def test_non_utf8_names_survive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    odd = os.fsencode(src) + b"/caf\xe9 name"
    with open(odd, "wb") as f:
        f.write(b"x")
    out = tmp_path / "out"
    unpack_image(io.BytesIO(pack_bytes(src)), out)
    assert os.listdir(os.fsencode(out)) == [b"caf\xe9 name"]
