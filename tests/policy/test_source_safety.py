"""Policy files may be read as root (Slurm prolog/epilog): links, owners, odd files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from hpcckpt.errors import PolicyError
from hpcckpt.policy import build_policy
from hpcckpt.policy.source import MAX_POLICY_BYTES

Write = Callable[[str, str], Path]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="ownership rules apply only when running as root")
OTHER_UID = 54321


@as_root
def test_user_planted_symlink_is_not_followed(write: Write, tmp_path: Path) -> None:
    secret = write("secret.yaml", "storage: {root: /root/private}\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(secret)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(PolicyError, match="symbolic link not owned by root"):
        build_policy(link, None, {}, user_uid=OTHER_UID)


@as_root
def test_root_owned_symlink_is_followed(write: Write, tmp_path: Path) -> None:
    target = write("real.yaml", "interval: 2h\n")
    link = tmp_path / "policy.yaml"
    link.symlink_to(target)
    assert build_policy(None, link, {}).interval == 7200


@as_root
def test_foreign_owner_refused_unless_trusted(write: Write) -> None:
    path = write("user.yaml", "interval: 2h\n")
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(PolicyError, match=f"owned by uid {OTHER_UID}, which is not trusted"):
        build_policy(path, None, {})
    assert build_policy(path, None, {}, user_uid=OTHER_UID).interval == 7200
    with pytest.raises(PolicyError, match="not trusted"):
        build_policy(None, path, {}, user_uid=OTHER_UID)  # a site policy must be root's


@as_root
def test_writable_site_policy_refused(write: Write) -> None:
    path = write("site.yaml", "interval: 2h\n")
    path.chmod(0o664)
    with pytest.raises(PolicyError, match="writable by group or others"):
        build_policy(None, path, {})


def test_fifo_and_directory_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):
        build_policy(fifo, None, {})
    with pytest.raises(PolicyError, match="not a regular file"):
        build_policy(tmp_path, None, {})


def test_huge_and_binary_files_refused(write: Write, tmp_path: Path) -> None:
    big = write("big.yaml", "#" * (MAX_POLICY_BYTES + 10))
    with pytest.raises(PolicyError, match="limit is"):
        build_policy(big, None, {})
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"interval: 1h\n\xff\xfe")
    with pytest.raises(PolicyError, match=r"not UTF-8 text \(bad byte at offset 13\)"):
        build_policy(binary, None, {})
