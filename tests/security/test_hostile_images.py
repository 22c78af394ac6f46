"""Hostile hpcckpt images, every byte checksummed correctly: refused before CRIU could run.

Each image here is built with the real record writer, so checksums, record
indexes and the trailer digest are all valid: only the content is malicious.
That is what an attacker who knows the format produces, and what a checksum
cannot catch.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
import xxhash

from hpcckpt.context import User, user_by_name
from hpcckpt.core import security
from hpcckpt.errors import HpcckptError
from hpcckpt.image import ImageMeta, pack_dir, read_header, unpack_image, verify_image
from hpcckpt.image import format as F
from hpcckpt.image.errors import ImageError, UnsafeImageError
from hpcckpt.image.pack import _header_payload, _prepare_meta
from hpcckpt.image.records import RecordWriter
from tests.security import pbcraft as pb
from tests.security.users import UnixUser, run_as

ROOT = User("root", 0, 0, "/root")

Section = tuple[int, int, bytes, Sequence[tuple[int, bytes]], int]  # kind, st_mode, name, chunks, size


def craft(sections: Sequence[Section], *, meta: ImageMeta | None = None, section_numbers: Sequence[int] = ()) -> bytes:
    """A complete, correctly checksummed image holding exactly these sections."""
    out = io.BytesIO()
    w = RecordWriter(out)
    w.write(F.T_HEADER, [_header_payload(_prepare_meta(meta or ImageMeta(ckptid=1, job_id="1", engine="criu")))])
    for i, (kind, mode, name, chunks, size) in enumerate(sections):
        num = section_numbers[i] if section_numbers else i
        w.write(F.T_SECTION_BEGIN, [F.SECTION_BEGIN.pack(num, kind, F.C_NONE, 0, mode, size, 0, len(name)), name])
        for offset, raw in chunks:
            fixed = F.CHUNK.pack(num, F.C_NONE, 0, 0, offset, len(raw), xxhash.xxh3_128_digest(raw))
            w.write(F.T_CHUNK, [fixed, raw])
        w.write(F.T_SECTION_END, [F.SECTION_END.pack(num, len(chunks), size)])
    w.finish()
    return out.getvalue()


def file_section(name: bytes, data: bytes, mode: int = stat.S_IFREG | 0o600) -> Section:
    return (F.K_FILE, mode, name, [(0, data)] if data else [], len(data))


def refused(tmp_path: Path, blob: bytes, match: str | None = None) -> None:
    """verify_image and unpack_image both refuse, and unpack leaves nothing behind."""
    src = tmp_path / "hostile.hck"
    src.write_bytes(blob)
    with pytest.raises(ImageError, match=match):
        verify_image(src)
    dest = tmp_path / "dest"
    with pytest.raises(ImageError, match=match):
        unpack_image(src, dest)
    assert not dest.exists() or list(dest.iterdir()) == [], "a refused image left files for CRIU"
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_control_image_is_accepted(tmp_path: Path) -> None:
    blob = craft([file_section(b"core-1.img", b"hello")])
    (tmp_path / "ok.hck").write_bytes(blob)
    unpack_image(tmp_path / "ok.hck", tmp_path / "dest")
    assert (tmp_path / "dest" / "core-1.img").read_bytes() == b"hello"


# --- huge lengths -----------------------------------------------------------------


def test_record_claiming_4gib_is_refused_without_allocating(tmp_path: Path) -> None:
    blob = bytearray(craft([file_section(b"core-1.img", b"x")]))
    off = F.PREAMBLE.size  # the header record
    rtype, flags, _, _ = F.RECORD_HEADER.unpack_from(blob, off)
    struct.pack_into("<HHI", blob, off, rtype, flags, 0xFFFFFFFF)
    refused(tmp_path, bytes(blob), r"offset 20, record 0 \(header\): record length 4294967295 exceeds")


def test_section_claiming_exabytes_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, craft([(F.K_FILE, stat.S_IFREG | 0o600, b"pages-1.img", [(0, b"abc")], 1 << 60)]))


def test_chunk_past_section_end_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, craft([(F.K_FILE, stat.S_IFREG | 0o600, b"core-1.img", [(1 << 40, b"abc")], 3)]))


# --- names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [b"../evil", b"../../evil", b"/tmp/evil", b"a/../../evil", b"./evil", b"a//evil", b"", b"ev\0il", b"a/" * 3000],
    ids=lambda n: repr(n)[:24],
)
def test_path_traversal_names_are_refused(tmp_path: Path, name: bytes) -> None:
    refused(tmp_path, craft([file_section(name, b"pwned")]))


# --- devices, symlinks, special bits ---------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o600, stat.S_IFLNK | 0o777, stat.S_IFIFO | 0o600, stat.S_IFSOCK | 0o600],
    ids=["chardev", "blockdev", "symlink", "fifo", "socket"],
)
def test_special_files_never_become_special(tmp_path: Path, mode: int) -> None:
    """A section may claim any st_mode: the unpacked file must still be a plain file (or refused)."""
    src = tmp_path / "img.hck"
    src.write_bytes(craft([file_section(b"core-1.img", b"/etc/shadow", mode=mode)]))
    dest = tmp_path / "dest"
    try:
        unpack_image(src, dest)
    except ImageError:
        assert not dest.exists() or list(dest.iterdir()) == []
        return
    st = (dest / "core-1.img").lstat()
    assert stat.S_ISREG(st.st_mode), f"unpack created a {stat.filemode(st.st_mode)}"


@pytest.mark.parametrize("kind", [0, 3, 255])
def test_unknown_section_kinds_are_refused(tmp_path: Path, kind: int) -> None:
    refused(tmp_path, craft([(kind, stat.S_IFREG | 0o600, b"core-1.img", [], 0)]))


def test_setuid_bits_are_stripped(tmp_path: Path) -> None:
    src = tmp_path / "img.hck"
    src.write_bytes(craft([file_section(b"tool", b"#!/bin/sh\n", mode=stat.S_IFREG | 0o6777)]))
    unpack_image(src, tmp_path / "dest")
    mode = (tmp_path / "dest" / "tool").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    # The file keeps the permission bits it claims, but no one else can reach it.
    assert stat.S_IMODE((tmp_path / "dest").stat().st_mode) == 0o700


def test_symlink_planted_in_destination_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    (dest / "core-1.img").symlink_to(victim / "owned")
    src = tmp_path / "img.hck"
    src.write_bytes(craft([file_section(b"core-1.img", b"data")]))
    with pytest.raises(HpcckptError):  # a non-empty target is refused outright
        unpack_image(src, dest)
    assert list(victim.iterdir()) == [], "unpack wrote through a planted symlink"


# --- duplicated and out-of-order records ---------------------------------------------------


def test_duplicate_section_names_are_refused(tmp_path: Path) -> None:
    refused(tmp_path, craft([file_section(b"core-1.img", b"one"), file_section(b"core-1.img", b"two")]))


def test_duplicate_section_numbers_are_refused(tmp_path: Path) -> None:
    blob = craft([file_section(b"a.img", b"1"), file_section(b"b.img", b"2")], section_numbers=[0, 0])
    refused(tmp_path, blob)


def test_overlapping_and_out_of_order_chunks_are_refused(tmp_path: Path) -> None:
    dup = (F.K_FILE, stat.S_IFREG | 0o600, b"pages-1.img", [(0, b"abcd"), (0, b"abcd")], 8)
    refused(tmp_path, craft([dup]))
    swapped = (F.K_FILE, stat.S_IFREG | 0o600, b"pages-1.img", [(4, b"efgh"), (0, b"abcd")], 8)
    refused(tmp_path, craft([swapped]))


def test_records_swapped_between_positions_fail_their_checksums(tmp_path: Path) -> None:
    blob = craft([file_section(b"a.img", b"1111"), file_section(b"b.img", b"2222")])
    # Cut the records apart and swap the two section_begin records whole.
    recs = []
    off = F.PREAMBLE.size
    while off < len(blob):
        _, _, length, _ = F.RECORD_HEADER.unpack_from(blob, off)
        recs.append(blob[off : off + F.RECORD_HEADER.size + length])
        off += F.RECORD_HEADER.size + length
    begins = [i for i, r in enumerate(recs) if F.RECORD_HEADER.unpack_from(r)[0] == F.T_SECTION_BEGIN]
    recs[begins[0]], recs[begins[1]] = recs[begins[1]], recs[begins[0]]
    refused(tmp_path, blob[: F.PREAMBLE.size] + b"".join(recs), "checksum")


# --- valid checksum, malicious content -----------------------------------------------------


def test_valid_image_with_uid0_processes_passes_format_checks_but_not_the_restore_gate(tmp_path: Path) -> None:
    """The format cannot know what CRIU will do with the bytes; the credential check does."""
    core = pb.image(pb.CORE_MAGIC, [pb.core(0, 0)])
    src = tmp_path / "img.hck"
    src.write_bytes(craft([file_section(b"core-1.img", core)], meta=ImageMeta(ckptid=1, job_id="1", engine="criu",
                                                                              uid=0)))
    if os.geteuid() == 0:
        os.chown(src, 1002, 1002)  # as if bob's: root will restore it as its owner
    verify_image(src)  # well-formed
    unpack_image(src, tmp_path / "criu")
    with pytest.raises(UnsafeImageError, match=r"uid 0 is not the image owner's"):
        security.authorize_restore(src, tmp_path / "criu", ROOT, allow_root=True)


@pytest.mark.multiuser
def test_image_copied_from_another_user_is_refused(alice: UnixUser, bob: UnixUser, shared_tmp: Path) -> None:
    """alice hands bob a copy of her image (or bob finds a readable one); he puts it in his own store."""
    src_dir = shared_tmp / "alice-criu"
    src_dir.mkdir()
    (src_dir / "core-1.img").write_bytes(pb.image(pb.CORE_MAGIC, [pb.core(alice.uid, alice.gid)]))
    alice_img = shared_tmp / "alice.hck"
    with open(alice_img, "wb") as out:
        pack_dir(src_dir, out, ImageMeta(ckptid=3, job_id="300", engine="criu", uid=alice.uid, gid=alice.gid,
                                         user="alice"))
    alice_img.chmod(0o644)
    bob_store = shared_tmp / "bob-store"
    bob_store.mkdir()
    os.chown(bob_store, bob.uid, bob.gid)
    copy = bob_store / "ckpt-3.hck"
    res = run_as(bob, ["cp", str(alice_img), str(copy)])
    assert res.returncode == 0, res.stderr
    assert copy.stat().st_uid == bob.uid
    header = read_header(copy)
    unpacked = shared_tmp / "bob-unpacked"
    unpack_image(copy, unpacked)
    b = user_by_name("bob")
    for caller, allow in ((b, False), (ROOT, True)):
        with pytest.raises(UnsafeImageError, match=r"taken from alice's job"):
            security.authorize_restore(copy, unpacked, caller, header_uid=header.uid, allow_root=allow)
    shutil.rmtree(unpacked)
