"""Through the real CLI, as the real users: bob cannot list, inspect, verify, gc, resume or read alice's checkpoints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from hpcckpt.fs import safe as fsutil
from tests.security.users import UnixUser, hpcckpt_as, run_as

pytestmark = pytest.mark.multiuser

# Run as alice: publish one real checkpoint the way the runner does (catalog row, then image, then commit).
PUBLISH = """
import sys
from pathlib import Path
from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.image import ImageMeta, pack_dir
from hpcckpt.store.images import Store
root, src = Path(sys.argv[1]), Path(sys.argv[2])
me = current_user()
cat = open_catalog(None, root, me)
with Store(root, me).publish(cat, job_id="300", engine="criu", node="node1") as pub:
    pack_dir(src, pub.file, ImageMeta(ckptid=pub.ckptid, job_id="300", engine="criu", uid=me.uid, gid=me.gid,
                                      user=me.name))
print(pub.ckptid, pub.path)
cat.close()
"""


@pytest.fixture
def alices_checkpoint(alice: UnixUser, bob: UnixUser, shared_tmp: Path) -> tuple[Path, int, Path]:
    """(store root, ckptid, image path) of one committed checkpoint of alice's."""
    root = shared_tmp / "store"
    root.mkdir(mode=0o755)
    for u in (alice, bob):  # what the prolog does for each job's user
        fsutil.ensure_private_dir(root / u.name, u.uid, u.gid, base=root)
    src = shared_tmp / "alice-src"
    src.mkdir(mode=0o700)
    os.chown(src, alice.uid, alice.gid)
    res = run_as(alice, ["sh", "-c", f"echo alice-secret-memory > {src}/pages-1.img"])
    assert res.returncode == 0, res.stderr
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = run_as(alice, [sys.executable, "-c", PUBLISH, str(root), str(src)], env=env)
    assert res.returncode == 0, res.stderr
    ckptid_s, path_s = res.stdout.split()
    return root, int(ckptid_s), Path(path_s)


def env_for(root: Path) -> dict[str, str]:
    return {"HPCCKPT_STORE": str(root)}


def test_alice_sees_her_checkpoint(alice: UnixUser, alices_checkpoint: tuple[Path, int, Path]) -> None:
    root, ckptid, path = alices_checkpoint
    res = hpcckpt_as(alice, ["list", "--json"], env=env_for(root))
    assert res.returncode == 0, res.stderr
    assert [r["ckptid"] for r in json.loads(res.stdout)] == [ckptid]
    res = hpcckpt_as(alice, ["verify", str(ckptid)], env=env_for(root))
    assert res.returncode == 0, res.stderr
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert oct(path.parent.stat().st_mode & 0o777) == oct(0o700)


def test_bob_cannot_list_alices(bob: UnixUser, alices_checkpoint: tuple[Path, int, Path]) -> None:
    root, _, _ = alices_checkpoint
    res = hpcckpt_as(bob, ["list", "--json"], env=env_for(root))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []
    res = hpcckpt_as(bob, ["list", "--json", "--user", "alice"], env=env_for(root))
    assert res.returncode != 0 or json.loads(res.stdout) == []


@pytest.mark.parametrize("cmd", ["info", "verify"])
def test_bob_cannot_inspect_alices_by_id_or_path(
    bob: UnixUser, alices_checkpoint: tuple[Path, int, Path], cmd: str
) -> None:
    root, ckptid, path = alices_checkpoint
    res = hpcckpt_as(bob, [cmd, str(ckptid)], env=env_for(root))
    assert res.returncode == 11, (res.returncode, res.stderr)  # not found: his catalog has no such row
    res = hpcckpt_as(bob, [cmd, str(path)], env=env_for(root))
    # Refused by the kernel (alice's dir is 0700). hpcckpt.store.resolve reports it as
    # "no such image file" (11) today; "permission denied" (5) would be clearer.
    assert res.returncode in (5, 10, 11), (res.returncode, res.stderr)
    assert "alice-secret-memory" not in res.stdout + res.stderr
    assert "job 300" not in res.stdout, "bob saw alice's header"


def test_bob_cannot_read_alices_files_or_catalog(bob: UnixUser, alices_checkpoint: tuple[Path, int, Path]) -> None:
    root, _, path = alices_checkpoint
    res = run_as(bob, ["cat", str(path)])
    assert res.returncode != 0 and "Permission denied" in res.stderr
    catalog = root / "alice" / "catalog.sqlite"
    res = run_as(bob, [sys.executable, "-c", f"import sqlite3; sqlite3.connect('file:{catalog}?mode=ro', uri=True)"
                       ".execute('select * from checkpoints').fetchall()"])
    assert res.returncode != 0 and "unable to open" in res.stderr
    res = hpcckpt_as(bob, ["list", "--catalog", str(catalog)], env=env_for(root))
    assert res.returncode != 0


def test_bob_cannot_gc_alices(alice: UnixUser, bob: UnixUser, alices_checkpoint: tuple[Path, int, Path]) -> None:
    root, _, path = alices_checkpoint
    res = hpcckpt_as(bob, ["gc", "--user", "alice", "--keep-last", "0"], env=env_for(root))
    assert res.returncode != 0, res.stdout
    res = hpcckpt_as(bob, ["gc", "--keep-last", "0"], env=env_for(root))
    assert path.exists(), "bob's gc removed alice's image"


def test_bob_cannot_resume_alices(bob: UnixUser, alices_checkpoint: tuple[Path, int, Path]) -> None:
    root, ckptid, path = alices_checkpoint
    for target in ("300", str(ckptid), str(path)):
        res = hpcckpt_as(bob, ["resume", target], env=env_for(root), timeout=60)
        # not found in bob's catalog (11), unreadable (5) or not his (10); an image path is no job id at
        # all (2: it names characters a job id may not hold, and says nothing of alice's image)
        allowed = (2, 5, 10, 11) if "/" in target else (5, 10, 11)
        assert res.returncode in allowed, (target, res.returncode, res.stderr)
    assert path.exists()


@pytest.mark.criu
def test_root_resume_of_bobs_crafted_uid0_image_is_refused(bob: UnixUser, shared_tmp: Path) -> None:
    """bob's own checkpoint, with uid 0 patched into its CRIU core image, handed to root's 'hpcckpt resume'."""
    import subprocess

    from tests.security import pbcraft as pb
    from tests.security.conftest import criu_dump_as

    root = shared_tmp / "store"
    root.mkdir(mode=0o755)
    fsutil.ensure_private_dir(root / bob.name, bob.uid, bob.gid, base=root)
    dump = criu_dump_as(bob, shared_tmp / "bob-dump")
    pb.patch_core_creds(sorted(dump.glob("core-*.img"))[0], uid=0, gid=0)
    for p in [dump, *dump.iterdir()]:
        os.chown(p, bob.uid, bob.gid)
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = run_as(bob, [sys.executable, "-c", PUBLISH.replace('"300"', '"666"'), str(root), str(dump)], env=env)
    assert res.returncode == 0, res.stderr
    image = Path(res.stdout.split()[1])
    catalog = root / bob.name / "catalog.sqlite"
    marker = shared_tmp / "restored-as-root"
    (shared_tmp / "stg").mkdir(mode=0o1777)
    (shared_tmp / "stg").chmod(0o1777)
    for extra, code, says in (
        # root as itself: not root's checkpoint, refused before the image's content is even looked at
        ([], 10, "belongs to bob"),
        # root acting as bob: the image's content is refused (uid 0 inside is not bob's); CRIU never ran
        (["--as-owner", "bob"], 4, "uid 0"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "hpcckpt", "resume", "666", "--store", str(root), "--catalog", str(catalog),
             *extra],
            capture_output=True, text=True, timeout=120, cwd=shared_tmp,
            env={**os.environ, **env, "HPCCKPT_LOG_FORMAT": "human", "HPCCKPT_STAGING": str(shared_tmp / "stg")},
        )
        assert out.returncode == code, (extra, out.returncode, out.stderr)
        assert says in out.stderr, out.stderr
        assert "resumed from checkpoint" not in out.stderr
    assert image.exists() and not marker.exists()
    assert not list((shared_tmp / "stg").rglob("restore.log")), "criu restore was started"
