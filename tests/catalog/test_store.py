"""Store layout, atomic publish and the path-safety helpers in hpcckpt.fs.safe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcckpt.catalog import Catalog, Status, open_catalog
from hpcckpt.context import User, user_by_name
from hpcckpt.errors import CatalogError, StoreError, UnsafePathError
from hpcckpt.fs.safe import atomic_write_bytes, ensure_private_dir, safe_job_component
from hpcckpt.store.images import Store


def test_publish_commits_durable_private_image(cat: Catalog, store_root: Path, me: User) -> None:
    store = Store(store_root, me)
    with store.publish(cat, job_id="4242", engine="criu", node="n1", step="batch") as pub:
        # Until commit, no reader takes it.
        assert cat.latest("4242") is None
        rec = cat.get(pub.ckptid)
        assert rec is not None and rec.status is Status.WRITING
        pub.file.write(b"image bytes" * 1000)
    rec = cat.latest("4242")
    assert rec is not None and rec.ckptid == pub.ckptid and rec.step == "batch"
    path = store_root / me.name / "4242" / f"ckpt-{pub.ckptid}.hck"
    assert rec.path == str(path) and rec.size_bytes == 11000
    assert path.read_bytes() == b"image bytes" * 1000
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left


def test_publish_failure_leaves_nothing_and_keeps_previous(cat: Catalog, store_root: Path, me: User) -> None:
    store = Store(store_root, me)
    with store.publish(cat, job_id="j", engine="criu", node="n1") as first:
        first.file.write(b"good")
    with pytest.raises(RuntimeError, match="dump failed"), \
            store.publish(cat, job_id="j", engine="criu", node="n1") as pub:
        pub.file.write(b"partial")
        raise RuntimeError("dump failed")
    latest = cat.latest("j")
    assert latest is not None and latest.ckptid == first.ckptid
    failed = cat.get(pub.ckptid)
    assert failed is not None and failed.status is Status.FAILED and "dump failed" in failed.error
    assert sorted(p.name for p in (store_root / me.name / "j").iterdir()) == [f"ckpt-{first.ckptid}.hck"]


def test_publish_file_copies_staged_image(cat: Catalog, store_root: Path, me: User, tmp_path: Path) -> None:
    staged = tmp_path / "staged.hck"
    staged.write_bytes(os.urandom(3 << 20))
    rec = Store(store_root, me).publish_file(cat, staged, job_id="9", engine="criu", node="n2")
    assert rec.status is Status.COMMITTED and rec.size_bytes == 3 << 20
    assert Path(rec.path).read_bytes() == staged.read_bytes()


def test_hostile_job_ids_stay_inside_the_user_dir(cat: Catalog, store_root: Path, me: User) -> None:
    store = Store(store_root, me)
    for job in ("../../etc", "a/b", "x\ny", ".hidden", "..", "$(rm -rf /)", "é" * 200):
        with store.publish(cat, job_id=job, engine="files", node="n") as pub:
            pub.file.write(b"x")
        assert pub.path.parent.parent == store_root / me.name, job
        latest = cat.latest(job)
        assert latest is not None and latest.job_id == job


@pytest.mark.multiuser
def test_root_publishes_as_the_job_user(store_root: Path) -> None:
    alice = user_by_name("alice")
    cat = open_catalog(None, store_root, alice)
    try:
        with Store(store_root, alice).publish(cat, job_id="1", engine="criu", node="n") as pub:
            pub.file.write(b"x")
    finally:
        cat.close()
    for p in (store_root / "alice", pub.path.parent, pub.path):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (alice.uid, alice.gid), p


@pytest.mark.multiuser
def test_planted_symlink_is_refused(cat: Catalog, store_root: Path, me: User, tmp_path: Path) -> None:
    alice = user_by_name("alice")
    target = tmp_path / "victim"
    target.mkdir()
    (store_root / "alice").mkdir(mode=0o700)
    os.chown(store_root / "alice", alice.uid, alice.gid)
    os.symlink(target, store_root / "alice" / "77")
    with pytest.raises(UnsafePathError, match="symlink"):
        Store(store_root, alice).job_dir("77")
    assert list(target.iterdir()) == []


@pytest.mark.multiuser
def test_dir_owned_by_someone_else_is_refused(store_root: Path) -> None:
    alice, bob = user_by_name("alice"), user_by_name("bob")
    (store_root / "alice").mkdir(mode=0o700)
    os.chown(store_root / "alice", bob.uid, bob.gid)  # bob got there first in a 1777 root
    with pytest.raises(UnsafePathError, match=f"owned by uid {bob.uid}"):
        ensure_private_dir(store_root / "alice" / "1", alice.uid, alice.gid, base=store_root)


def test_existing_wide_dir_is_tightened(store_root: Path, me: User) -> None:
    d = store_root / me.name
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    ensure_private_dir(d / "job", me.uid, me.gid, base=store_root)
    assert d.stat().st_mode & 0o777 == 0o700


def test_atomic_write_bytes_replaces(tmp_path: Path) -> None:
    p = tmp_path / "f"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two" and p.stat().st_mode & 0o777 == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_safe_component_known_values() -> None:
    assert safe_job_component("4242") == "4242"
    assert safe_job_component("4242_7") == "4242_7"
    assert safe_job_component("4242+1") == "4242+1"
    assert safe_job_component("..") != ".."
    assert "/" not in safe_job_component("../x")
    with pytest.raises(StoreError):
        safe_job_component("")


@given(st.text(min_size=1, max_size=300))
def test_safe_component_is_one_safe_name(job: str) -> None:
    name = safe_job_component(job)
    assert name not in (".", "..") and "/" not in name and "\x00" not in name and "\n" not in name
    assert 0 < len(name.encode("utf-8", "surrogateescape")) <= 100


@given(st.text(min_size=1, max_size=50), st.text(min_size=1, max_size=50))
def test_safe_component_injective(a: str, b: str) -> None:
    if a != b:
        assert safe_job_component(a) != safe_job_component(b)


@pytest.mark.multiuser
def test_root_never_writes_through_a_users_planted_journal_link(store_root: Path, tmp_path: Path) -> None:
    """SQLite opens its journal by name; root acting for alice must do it with alice's rights."""
    alice = user_by_name("alice")
    cat = open_catalog(None, store_root, alice)
    cat.close()
    victim = tmp_path / "root-only"
    victim.write_bytes(b"precious")
    victim.chmod(0o600)
    os.symlink(victim, store_root / "alice" / "catalog.sqlite-journal")
    cat = open_catalog(None, store_root, alice)
    try:
        with pytest.raises(CatalogError, match="unable to open"):
            cat.begin(job_id="1", uid=alice.uid, user="alice", node="n", engine="criu")
    finally:
        cat.close()
    assert victim.read_bytes() == b"precious"


def test_companion_files_live_and_die_with_their_checkpoint(cat: Catalog, store_root: Path, me: User) -> None:
    from hpcckpt.store.gc import collect_garbage
    from hpcckpt.store.images import parse_image_name, parse_store_name
    from hpcckpt.store.retention import RetentionRules, apply_retention

    assert parse_image_name("ckpt-7.hck") == 7
    assert parse_image_name("ckpt-7.r3.hck") is None
    assert parse_store_name("ckpt-7.r3.hck") == (7, "r3")
    assert parse_store_name("ckpt-7.r3.x.hck") is None

    store = Store(store_root, me)
    ids = []
    for _ in range(3):
        with store.publish(cat, job_id="app", engine="app", node="n1") as pub:
            pub.file.write(b"manifest")
        for rank in range(2):
            atomic_write_bytes(pub.path.parent / f"ckpt-{pub.ckptid}.r{rank}.hck", b"shard")
        ids.append(pub.ckptid)
    entries = store.scan()
    assert sorted(e.ckptid or 0 for e in entries if e.companion) == sorted([i for i in ids for _ in range(2)])

    # Retention deletes the oldest checkpoint with its shards, nothing else.
    apply_retention(cat, store, RetentionRules(keep_last=2), job_id="app")
    left = sorted(p.name for p in store.job_dir("app").iterdir())
    assert left == sorted(f"ckpt-{i}{tag}.hck" for i in ids[1:] for tag in ("", ".r0", ".r1"))

    # A failed checkpoint's shards go with gc; a committed one's stay.
    cat.fail(ids[1], "bad shard found by verify")
    collect_garbage(cat, store, RetentionRules(keep_last=5), dry_run=False, grace=0)
    left = sorted(p.name for p in store.job_dir("app").iterdir())
    assert left == sorted(f"ckpt-{ids[2]}{tag}.hck" for tag in ("", ".r0", ".r1"))
