"""The CRIU credential reader against hand-built hostile images (pure logic, no CRIU)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from hpcckpt.criu import images as criuimg
from hpcckpt.image.errors import CorruptImageError, UnsafeImageError
from tests.security import pbcraft as pb

ALICE, ALICE_GID = 1001, 1001


def write(d: Path, name: str, data: bytes) -> Path:
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_bytes(data)
    return p


def test_core_creds_are_all_extracted(tmp_path: Path) -> None:
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [pb.core(ALICE, ALICE_GID, groups=[ALICE_GID, 27])]))
    got = criuimg.image_credentials(tmp_path)
    assert {("uid", ALICE), ("euid", ALICE), ("suid", ALICE), ("fsuid", ALICE)} <= got
    assert {("gid", ALICE_GID), ("egid", ALICE_GID), ("sgid", ALICE_GID), ("fsgid", ALICE_GID)} <= got
    assert ("groups", 27) in got


def test_owner_image_passes_and_other_user_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [pb.core(ALICE, ALICE_GID)]))
    assert criuimg.check_credentials(tmp_path, ALICE, ALICE_GID, [ALICE_GID])
    with pytest.raises(UnsafeImageError, match=r"core-1\.img.*uid 1001 is not the image owner's \(uid 1002\)"):
        criuimg.check_credentials(tmp_path, 1002, 1002)


def test_uid_zero_claim_is_refused_with_file_and_offset(tmp_path: Path) -> None:
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [pb.core(ALICE, ALICE_GID)]))
    write(tmp_path, "core-7.img", pb.image(pb.CORE_MAGIC, [pb.core(0, ALICE_GID)]))
    with pytest.raises(UnsafeImageError) as err:
        criuimg.check_credentials(tmp_path, ALICE, ALICE_GID)
    assert "core-7.img" in str(err.value) and "offset 8" in str(err.value) and " 0 is not" in str(err.value)


def test_supplementary_group_not_held_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [pb.core(ALICE, ALICE_GID, groups=[0])]))
    with pytest.raises(UnsafeImageError, match="groups 0"):
        criuimg.check_credentials(tmp_path, ALICE, ALICE_GID, [ALICE_GID])


def test_packed_repeated_groups_are_read(tmp_path: Path) -> None:
    body = pb.creds(ALICE, ALICE_GID) + pb.fb(14, pb.varint(4) + pb.varint(0))
    entry = pb.fv(1, 1) + pb.fb(5, pb.fb(10, body))
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [entry]))
    assert ("groups", 0) in criuimg.image_credentials(tmp_path)


def test_fown_counts_only_with_an_owner_pid(tmp_path: Path) -> None:
    # reg file with fown {uid 0, euid 0, pid 0}: CRIU's "no owner", ignored.
    quiet = pb.fv(1, 1) + pb.fv(2, 1) + pb.fb(3, pb.fv(1, 1) + pb.fb(5, pb.fv(1, 0) + pb.fv(2, 0) + pb.fv(5, 0)))
    write(tmp_path, "files.img", pb.image(pb.FILES_MAGIC, [quiet]))
    assert criuimg.image_credentials(tmp_path) == set()
    owned = pb.fv(1, 1) + pb.fv(2, 2) + pb.fb(3, pb.fv(1, 2) + pb.fb(5, pb.fv(1, 0) + pb.fv(2, 0) + pb.fv(5, 77)))
    write(tmp_path, "files.img", pb.image(pb.FILES_MAGIC, [quiet, owned]))
    assert criuimg.image_credentials(tmp_path) == {("fown_uid", 0), ("fown_euid", 0)}
    with pytest.raises(UnsafeImageError, match=r"fown_(e)?uid 0"):
        criuimg.check_credentials(tmp_path, ALICE, ALICE_GID)


def test_userns_map_to_host_root_is_refused(tmp_path: Path) -> None:
    uid_map = pb.fb(1, pb.fv(1, 0) + pb.fv(2, ALICE) + pb.fv(3, 1))
    own = uid_map + pb.fb(2, pb.fv(1, 0) + pb.fv(2, ALICE_GID) + pb.fv(3, 1))
    write(tmp_path, "userns-1.img", pb.image(pb.USERNS_MAGIC, [own]))
    criuimg.check_credentials(tmp_path, ALICE, ALICE_GID)
    wide = pb.fb(1, pb.fv(1, 0) + pb.fv(2, 0) + pb.fv(3, 65536))
    write(tmp_path, "userns-1.img", pb.image(pb.USERNS_MAGIC, [wide]))
    with pytest.raises(UnsafeImageError, match="userns_uid 0 "):
        criuimg.check_credentials(tmp_path, ALICE, ALICE_GID)


def test_ghost_file_owner_is_checked_and_its_data_skipped(tmp_path: Path) -> None:
    # A deleted setuid-root file: CRIU as root would recreate and chown it.
    entry = pb.fv(1, 0) + pb.fv(2, 0) + pb.fv(3, 0o104755)
    data = b"\xff" * 100  # file content, not entries
    (tmp_path / "ghost-file-1.img").parent.mkdir(exist_ok=True)
    (tmp_path / "ghost-file-1.img").write_bytes(pb.image(pb.GHOST_FILE_MAGIC, [entry]) + data)
    assert criuimg.image_credentials(tmp_path) == {("file_uid", 0), ("file_gid", 0)}


def test_ipc_sem_payload_is_skipped_exactly(tmp_path: Path) -> None:
    desc = pb.fv(1, 5) + pb.fv(2, ALICE) + pb.fv(3, ALICE_GID) + pb.fv(4, ALICE) + pb.fv(5, ALICE_GID)
    first = pb.fb(1, desc) + pb.fv(2, 3)  # 3 semaphores: 6 bytes, padded to 8
    desc0 = pb.fv(1, 6) + pb.fv(2, 0) + pb.fv(3, 0) + pb.fv(4, 0) + pb.fv(5, 0)
    second = pb.fb(1, desc0) + pb.fv(2, 1)
    write(tmp_path, "ipcns-sem-1.img", pb.image(pb.IPCNS_SEM_MAGIC, [first, second], payloads=[b"\0" * 8, b"\0" * 8]))
    assert ("ipc_uid", 0) in criuimg.image_credentials(tmp_path)


def test_cgroup_perms_are_found_in_nested_dirs(tmp_path: Path) -> None:
    perms = pb.fv(1, 0o755) + pb.fv(2, 0) + pb.fv(3, 0)
    leaf = pb.fb(1, b"leaf") + pb.fb(4, perms)
    top = pb.fb(1, b"top") + pb.fb(2, leaf)
    write(tmp_path, "cgroup.img", pb.image(pb.CGROUP_MAGIC, [pb.fb(2, pb.fb(2, top))]))
    assert ("file_uid", 0) in criuimg.image_credentials(tmp_path)


# --- malformed and hostile structure ------------------------------------------


def test_huge_entry_length_is_refused_without_allocating(tmp_path: Path) -> None:
    data = struct.pack("<III", pb.IMG_COMMON_MAGIC, pb.CORE_MAGIC, 0xFFFFFFF0)
    write(tmp_path, "core-1.img", data)
    with pytest.raises(CorruptImageError, match=r"core-1\.img, offset 8, record 0 \(CORE\): entry claims 4294967280"):
        criuimg.scan_credentials(tmp_path)


def test_entry_longer_than_file_is_refused(tmp_path: Path) -> None:
    data = struct.pack("<III", pb.IMG_COMMON_MAGIC, pb.CORE_MAGIC, 100) + b"\x08\x01"
    write(tmp_path, "core-1.img", data)
    with pytest.raises(CorruptImageError, match="only 2 left"):
        criuimg.scan_credentials(tmp_path)


def test_submessage_overrunning_its_parent_is_refused(tmp_path: Path) -> None:
    entry = pb.fv(1, 1) + pb.varint(5 << 3 | 2) + pb.varint(200) + b"\x00" * 4
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [entry]))
    with pytest.raises(CorruptImageError, match="claims 200 bytes"):
        criuimg.scan_credentials(tmp_path)


def test_overlong_varint_and_wide_ids_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [b"\x08" + b"\xff" * 11]))
    with pytest.raises(CorruptImageError, match="varint"):
        criuimg.scan_credentials(tmp_path)
    entry = pb.fb(5, pb.fb(10, pb.fv(1, 1 << 32)))  # uid 2^32 would truncate to 0 in C
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [entry]))
    with pytest.raises(CorruptImageError, match="does not fit in 32 bits"):
        criuimg.scan_credentials(tmp_path)


def test_deep_nesting_is_bounded(tmp_path: Path) -> None:
    leaf = pb.fb(1, b"x")
    for _ in range(200):
        leaf = pb.fb(1, b"d") + pb.fb(2, leaf)  # cgroup dir children, nested 200 deep
    write(tmp_path, "cgroup.img", pb.image(pb.CGROUP_MAGIC, [pb.fb(2, pb.fb(2, leaf))]))
    with pytest.raises(CorruptImageError, match="nested deeper"):
        criuimg.scan_credentials(tmp_path)


def test_group_wire_types_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [pb.varint(1 << 3 | 3)]))
    with pytest.raises(CorruptImageError, match="wire type 3"):
        criuimg.scan_credentials(tmp_path)


def test_id_field_with_wrong_wire_type_is_refused(tmp_path: Path) -> None:
    # uid as fixed32: a C decoder would reject it; a lax reader might skip it.
    entry = pb.fb(5, pb.fb(10, pb.varint(1 << 3 | 5) + b"\0\0\0\0"))
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [entry]))
    with pytest.raises(CorruptImageError, match="fixed32"):
        criuimg.scan_credentials(tmp_path)


def test_unknown_magic_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "mystery.img", struct.pack("<II", pb.IMG_COMMON_MAGIC, 0x12345678))
    with pytest.raises(UnsafeImageError, match="unknown CRIU image magic 0x12345678"):
        criuimg.scan_credentials(tmp_path)


def test_too_many_distinct_ids_are_refused(tmp_path: Path) -> None:
    body = pb.fb(14, b"".join(pb.varint(g) for g in range(criuimg.MAX_DISTINCT + 1)))
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [pb.fb(5, pb.fb(10, body))]))
    with pytest.raises(UnsafeImageError, match="distinct ids"):
        criuimg.scan_credentials(tmp_path)


def test_raw_page_images_and_logs_are_not_parsed(tmp_path: Path) -> None:
    write(tmp_path, "pages-1.img", os.urandom(4096))
    write(tmp_path, "dump.log", b"anything")
    write(tmp_path, "empty.img", b"")
    assert criuimg.scan_credentials(tmp_path) == []


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir"])
def test_non_regular_members_are_refused(tmp_path: Path, kind: str) -> None:
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [pb.core(ALICE, ALICE_GID)]))
    target = tmp_path / "files.img"
    if kind == "symlink":
        target.symlink_to("/etc/passwd")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    with pytest.raises(UnsafeImageError, match=r"files\.img: is a (symlink|FIFO|directory)"):
        criuimg.scan_credentials(tmp_path)


def test_device_node_is_refused_without_being_opened(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    write(tmp_path, "core-1.img", pb.image(pb.CORE_MAGIC, [pb.core(ALICE, ALICE_GID)]))
    os.mknod(tmp_path / "pages-1.img", 0o600 | 0o020000, os.makedev(1, 3))  # /dev/null's numbers
    with pytest.raises(UnsafeImageError, match="character device"):
        criuimg.scan_credentials(tmp_path)


def test_images_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeImageError, match="symlink"):
        criuimg.scan_credentials(tmp_path / "link")
