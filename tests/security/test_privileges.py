"""Owner checks and privilege dropping, with the real users alice and bob."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcckpt.context import User, user_by_name
from hpcckpt.core import security
from hpcckpt.errors import PermissionDeniedError
from hpcckpt.image.errors import UnsafeImageError
from tests.security import pbcraft as pb
from tests.security.users import UnixUser, popen_credentials

pytestmark = pytest.mark.multiuser

ROOT = User("root", 0, 0, "/root")


@dataclass
class Record:
    """Stands in for a catalog CkptRecord: only ckptid and uid matter here."""

    ckptid: int
    uid: int


def owned_file(path: Path, user: UnixUser, data: bytes = b"x") -> Path:
    path.write_bytes(data)
    os.chown(path, user.uid, user.gid)
    path.chmod(0o600)
    return path


def test_require_owner_by_record_path_and_uid(alice: UnixUser, bob: UnixUser, shared_tmp: Path) -> None:
    a, b = user_by_name("alice"), user_by_name("bob")
    rec = Record(ckptid=7, uid=alice.uid)
    security.require_owner(rec, a)
    with pytest.raises(PermissionDeniedError, match=r"checkpoint 7 belongs to alice \(uid \d+\), not to bob"):
        security.require_owner(rec, b)
    img = owned_file(shared_tmp / "ckpt-7.hck", alice)
    security.require_owner(img, a)
    with pytest.raises(PermissionDeniedError, match="belongs to alice"):
        security.require_owner(img, b)
    with pytest.raises(PermissionDeniedError):
        security.require_owner(alice.uid, b)


def test_root_needs_to_ask_explicitly(alice: UnixUser) -> None:
    rec = Record(ckptid=3, uid=alice.uid)
    with pytest.raises(PermissionDeniedError, match="belongs to alice") as err:
        security.require_owner(rec, ROOT)
    assert err.value.hint and "explicitly" in err.value.hint
    security.require_owner(rec, ROOT, allow_root=True)


def test_restore_runs_as_the_file_owner(alice: UnixUser, shared_tmp: Path) -> None:
    img = owned_file(shared_tmp / "ckpt-1.hck", alice)
    owner = security.restore_credentials_for(img)
    assert (owner.name, owner.uid, owner.gid) == ("alice", alice.uid, alice.gid)


def test_symlinked_or_hardlinked_image_is_refused(alice: UnixUser, bob: UnixUser, shared_tmp: Path) -> None:
    img = owned_file(shared_tmp / "ckpt-1.hck", alice)
    link = shared_tmp / "link.hck"
    link.symlink_to(img)
    with pytest.raises(UnsafeImageError, match="symlink"):
        security.restore_credentials_for(link)
    hard = shared_tmp / "hard.hck"
    os.link(img, hard)
    with pytest.raises(UnsafeImageError, match="2 hard links"):
        security.restore_credentials_for(hard)


def test_image_copied_from_another_user_is_refused(alice: UnixUser, bob: UnixUser, shared_tmp: Path) -> None:
    # bob holds a copy (owned by bob) of an image whose header says alice took it.
    copy = owned_file(shared_tmp / "ckpt-9.hck", bob)
    owner = security.restore_credentials_for(copy)
    with pytest.raises(UnsafeImageError, match=r"taken from alice's job .* owned by bob"):
        security.check_image_identity(copy, alice.uid, owner)


def test_authorize_restore_refuses_uid0_image_even_for_root(bob: UnixUser, shared_tmp: Path) -> None:
    images = shared_tmp / "criu"
    images.mkdir()
    (images / "core-1.img").write_bytes(pb.image(pb.CORE_MAGIC, [pb.core(0, 0)]))
    img = owned_file(shared_tmp / "ckpt-5.hck", bob)
    b = user_by_name("bob")
    with pytest.raises(UnsafeImageError, match=r"uid 0 is not the image owner's \(uid \d+\)"):
        security.authorize_restore(img, images, ROOT, header_uid=bob.uid, allow_root=True)
    with pytest.raises(UnsafeImageError):
        security.authorize_restore(img, images, b, header_uid=bob.uid)


def test_authorize_restore_checks_catalog_and_caller(alice: UnixUser, bob: UnixUser, shared_tmp: Path) -> None:
    images = shared_tmp / "criu"
    images.mkdir()
    (images / "core-1.img").write_bytes(pb.image(pb.CORE_MAGIC, [pb.core(alice.uid, alice.gid)]))
    img = owned_file(shared_tmp / "ckpt-5.hck", alice)
    a, b = user_by_name("alice"), user_by_name("bob")
    assert security.authorize_restore(img, images, a, header_uid=alice.uid, record_uid=alice.uid).uid == alice.uid
    with pytest.raises(PermissionDeniedError):
        security.authorize_restore(img, images, b, header_uid=alice.uid)
    with pytest.raises(UnsafeImageError, match="catalog records uid"):
        security.authorize_restore(img, images, a, header_uid=alice.uid, record_uid=bob.uid)
    with pytest.raises(PermissionDeniedError):  # root, not asking explicitly
        security.authorize_restore(img, images, ROOT, header_uid=alice.uid)
    owner = security.authorize_restore(img, images, ROOT, header_uid=alice.uid, allow_root=True)
    assert owner.name == "alice"


def test_popen_credentials_run_the_child_as_the_user(alice: UnixUser) -> None:
    a = user_by_name("alice")
    out = subprocess.run(
        ["sh", "-c", 'id -u; id -g; id -G; echo "$HOME"; echo "${LD_PRELOAD-unset}"'],
        capture_output=True,
        text=True,
        check=True,
        env=security.child_environment(a),
        **popen_credentials(a),
    ).stdout.split("\n")
    assert out[0] == str(alice.uid) and out[1] == str(alice.gid)
    assert "0" not in out[2].split(), "root's group must not survive"
    assert out[3] == str(alice.home)
    assert out[4] == "unset"


def test_drop_privileges_is_irreversible(alice: UnixUser) -> None:
    a = user_by_name("alice")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop, then prove root cannot be regained
        os.close(r)
        code = 0
        try:
            security.drop_privileges_to(a)
            ids = f"{os.getresuid()} {os.getresgid()} {sorted(os.getgroups())}"
            try:
                os.setuid(0)
                ids += " REGAINED"
            except PermissionError:
                pass
            os.write(w, ids.encode())
        except BaseException as exc:
            os.write(w, repr(exc).encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as fh:
        text = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    u, g = alice.uid, alice.gid
    assert text.startswith(f"({u}, {u}, {u}) ({g}, {g}, {g})"), text
    assert "REGAINED" not in text


def test_drop_to_root_is_refused() -> None:
    with pytest.raises(PermissionDeniedError):
        security.drop_privileges_to(ROOT)


def test_child_environment_drops_roots_variables(monkeypatch: pytest.MonkeyPatch, alice: UnixUser) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("HPCCKPT_STORE", "/root/store")
    env = security.child_environment(user_by_name("alice"), {"SLURM_JOB_ID": "42"})
    assert "LD_PRELOAD" not in env and "HPCCKPT_STORE" not in env
    assert env["HOME"] == str(alice.home) and env["USER"] == "alice" and env["SLURM_JOB_ID"] == "42"
    assert shutil.which("sh", path=env["PATH"])
