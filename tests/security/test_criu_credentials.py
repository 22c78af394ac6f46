"""Real CRIU dumps taken as alice: their ids, a crafted uid-0 copy, and restoring as the owner."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hpcckpt.context import User, user_by_name
from hpcckpt.core import security
from hpcckpt.criu import images as criuimg
from hpcckpt.image.errors import UnsafeImageError
from tests.security import pbcraft as pb
from tests.security.conftest import CRIU
from tests.security.users import UnixUser, popen_credentials

pytestmark = [pytest.mark.criu, pytest.mark.multiuser]

ROOT = User("root", 0, 0, "/root")


def core_image(d: Path) -> Path:
    cores = sorted(d.glob("core-*.img"))
    assert cores, f"no core image in {d}"
    return cores[0]


def chown_tree(d: Path, user: UnixUser) -> None:
    os.chown(d, user.uid, user.gid)
    for p in d.iterdir():
        os.chown(p, user.uid, user.gid)


def test_real_dump_records_only_alices_ids(alice: UnixUser, bob: UnixUser, alice_dump: Path) -> None:
    creds = criuimg.image_credentials(alice_dump)
    assert ("uid", alice.uid) in creds and ("gid", alice.gid) in creds
    uids = {i for k, i in creds if k in criuimg.UID_KINDS}
    assert uids == {alice.uid}
    criuimg.check_credentials(alice_dump, alice.uid, alice.gid, security.supplementary_groups(user_by_name("alice")))
    with pytest.raises(UnsafeImageError, match=rf"core-\d+\.img: entry at offset 8: uid {alice.uid} "):
        criuimg.check_credentials(alice_dump, bob.uid, bob.gid)


def test_crafted_uid0_dump_is_refused_for_every_caller(bob: UnixUser, alice_dump: Path, shared_tmp: Path) -> None:
    crafted = shared_tmp / "bob-crafted"
    shutil.copytree(alice_dump, crafted)
    pb.patch_core_creds(core_image(crafted), uid=0, gid=0)
    chown_tree(crafted, bob)
    assert ("uid", 0) in criuimg.image_credentials(crafted)  # the patch took, and the image still parses
    hck = shared_tmp / "ckpt-1.hck"
    hck.write_bytes(b"stand-in for the packed image")
    os.chown(hck, bob.uid, bob.gid)
    b = user_by_name("bob")
    for caller, allow in ((ROOT, True), (b, False)):
        with pytest.raises(UnsafeImageError, match=r"uid 0 is not the image owner's"):
            security.authorize_restore(hck, crafted, caller, header_uid=bob.uid, allow_root=allow)


def _restore(images: Path, user: UnixUser, pidfile: Path) -> subprocess.CompletedProcess[str]:
    """criu restore -d as ``user``, the way hpcckpt does it on root's behalf."""
    u = user_by_name(user.name)
    return subprocess.run(
        [str(CRIU), "restore", "--unprivileged", "-d", "-D", str(images), "-o", "restore.log",
         "--pidfile", str(pidfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=security.child_environment(u),
        **popen_credentials(u),
    )


def _kill_restored(pidfile: Path) -> int | None:
    if not pidfile.exists():
        return None
    pid = int(pidfile.read_text().strip())
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        os.kill(pid, 9)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return uid


def test_root_restores_alices_image_as_alice(alice: UnixUser, alice_dump: Path) -> None:
    pidfile = alice_dump / "restored.pid"
    res = _restore(alice_dump, alice, pidfile)
    uid = _kill_restored(pidfile)
    log_path = alice_dump / "restore.log"
    log = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
    assert res.returncode == 0, f"{res.stderr}\n{log}"
    assert uid == alice.uid


def test_crafted_uid0_image_fails_even_if_criu_were_reached(bob: UnixUser, alice_dump: Path, shared_tmp: Path) -> None:
    """Defence in depth: restoring as the file owner cannot create a root process by itself."""
    crafted = shared_tmp / "bob-crafted"
    shutil.copytree(alice_dump, crafted)
    pb.patch_core_creds(core_image(crafted), uid=0, gid=0)
    chown_tree(crafted, bob)
    pidfile = crafted / "restored.pid"
    res = _restore(crafted, bob, pidfile)
    time.sleep(0.1)
    uid = _kill_restored(pidfile)
    assert uid != 0, "a root process was restored from a user's image"
    assert res.returncode != 0
    # The kernel refused the id switch: CRIU ran without CAP_SETUID/CAP_SETGID.
    assert "Can't set" in (crafted / "restore.log").read_text(errors="replace")
