"""The info, verify and image commands, run in-process through the real CLI entry point."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from hpcckpt.cli.main import main
from hpcckpt.context import User
from hpcckpt.errors import NotFoundError, PermissionDeniedError
from hpcckpt.image import TaskInfo, write_error_image
from hpcckpt.image.errors import UnreadableImageError
from hpcckpt.store.resolve import CkptRef, resolve_image
from tests.image.conftest import meta, pack_bytes


@pytest.fixture
def image(tree: Path, tmp_path: Path) -> Path:
    p = tmp_path / "ckpt-7.hck"
    tasks = [TaskInfo(1, 0, 1, 1, "bash", ["bash", "job.sh"]), TaskInfo(2, 1, 1, 1, "sim", ["./sim", "-n", "4"])]
    p.write_bytes(pack_bytes(tree, codec="zstd", tasks=tasks))
    return p


def test_info_human_and_json(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(image)]) == 0
    out = capsys.readouterr().out
    assert "job 4242" in out and "processes (2)" in out and "pages-1.img" in out and "zstd" in out
    assert "      2       1       1       1    sim  ./sim -n 4" in out  # child indented under its parent
    assert main(["info", "--json", str(image)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["meta"]["ckptid"] == 7 and doc["path"] == str(image)
    assert {s["name"] for s in doc["sections"]} >= {"pages-1.img", "sub", "sub/notes.txt"}
    assert all("ratio" in s for s in doc["sections"])


def test_info_shows_failed_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "failed.hck"
    with open(p, "wb") as f:
        write_error_image(f, meta(), "criu dump failed: (00.02) Error (criu/cr-dump.c:2093): Dumping FAILED.")
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "FAILED checkpoint" in out and "Dumping FAILED" in out
    assert main(["verify", str(p)]) == 4


def test_verify_exit_codes(image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(image)]) == 0
    assert capsys.readouterr().out.startswith("OK")
    bad = tmp_path / "bad.hck"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad.write_bytes(bytes(data))
    missing = tmp_path / "missing.hck"
    assert main(["verify", str(missing)]) == 5
    assert main(["verify", str(image), str(bad), str(missing)]) == 4  # corrupt outranks unreadable
    out = capsys.readouterr().out
    assert "CORRUPT" in out and f"{bad}, offset" in out
    assert main(["verify", "--json", str(image), str(bad)]) == 4
    doc = json.loads(capsys.readouterr().out)
    assert [d["status"] for d in doc] == ["ok", "corrupt"] and doc[1]["exit_code"] == 4


@pytest.mark.multiuser
def test_verify_unreadable_permission(image: Path) -> None:
    if os.geteuid() != 0:
        os.chmod(image, 0)
        assert main(["verify", str(image)]) == 10
        return
    # Root reads any file: ask as an ordinary user instead, on an image they may not read.
    import shutil
    import sys
    import tempfile

    from tests.security.users import REPO, ensure_user, run_as

    alice = ensure_user("alice")
    shared = Path(tempfile.mkdtemp(prefix="hpcckpt-unreadable-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        locked = shared / "locked.hck"
        shutil.copyfile(image, locked)
        locked.chmod(0o600)  # root's, unreadable to alice
        res = run_as(alice, [sys.executable, "-m", "hpcckpt", "verify", str(locked)], env={"PYTHONPATH": str(REPO)})
        # the permission error (10), not "unreadable" (5) and never "no such image file"
        assert res.returncode == 10, res.stdout + res.stderr
        assert "permission denied" in res.stdout + res.stderr
        # ... and the same bytes, readable, verify fine: the 10 was about access, not content.
        locked.chmod(0o644)
        ok = run_as(alice, [sys.executable, "-m", "hpcckpt", "verify", str(locked)], env={"PYTHONPATH": str(REPO)})
        assert ok.returncode == 0, ok.stdout + ok.stderr
    finally:
        shutil.rmtree(shared)


def test_pack_unpack_commands(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.hck"
    assert main(["image", "pack", "--codec", "lz4", "--chunk-size", "64K", str(tree), str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert main(["image", "pack", str(tree), str(out)]) == 7  # exists, no --force
    capsys.readouterr()
    assert main(["image", "unpack", "--json", str(out), str(tmp_path / "u")]) == 0
    assert len(json.loads(capsys.readouterr().out)["sections"]) == 5
    assert (tmp_path / "u" / "sub" / "notes.txt").read_text() == (tree / "sub" / "notes.txt").read_text()
    assert main(["image", "unpack", str(out), str(tmp_path / "u")]) == 7  # not empty
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (["info"], ["verify"], ["image"], ["image", "pack"], ["image", "unpack"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        assert "examples:" in capsys.readouterr().out


ALICE = User("alice", 1000, 1000, "/home/alice")
ROOT = User("root", 0, 0, "/root")


def test_resolve_ckptid_checks_owner(image: Path) -> None:
    refs = {7: CkptRef(7, 1001, str(image), "committed"), 8: CkptRef(8, 1000, str(image), "committed"),
            9: CkptRef(9, 1000, str(image), "deleted")}
    with pytest.raises(PermissionDeniedError, match="uid 1001"):
        resolve_image("7", ALICE, refs.get)
    assert resolve_image("7", ROOT, refs.get) == image
    assert resolve_image("8", ALICE, refs.get) == image
    with pytest.raises(NotFoundError, match="deleted"):
        resolve_image("9", ALICE, refs.get)
    with pytest.raises(NotFoundError, match="not in the catalog"):
        resolve_image("10", ALICE, refs.get)
    with pytest.raises(UnreadableImageError, match="no such image"):
        resolve_image("no/such/file.hck", ALICE, refs.get)


def test_resolve_refuses_symlinked_store_path(image: Path, tmp_path: Path) -> None:
    link = tmp_path / "ckpt-8.hck"
    link.symlink_to(image)
    with pytest.raises(UnreadableImageError, match="symlink"):
        resolve_image("8", ALICE, {8: CkptRef(8, 1000, str(link), "committed")}.get)


def test_pipe_pack_to_stdout(tree: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["image", "pack", str(tree), "-"]) == 0
    data = capsysbinary.readouterr().out
    from hpcckpt.image import verify_image

    assert len(verify_image(io.BytesIO(data)).sections) == 5
