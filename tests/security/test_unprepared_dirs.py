"""An ordinary user under directories nobody prepared gets a clear error, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcckpt.exitcodes import EXIT_STORE
from tests.security.users import REPO, UnixUser, hpcckpt_as, run_as, venv_bin

pytestmark = pytest.mark.multiuser


def test_run_under_a_root_owned_store_root_says_who_must_create_it(alice: UnixUser, shared_tmp: Path) -> None:
    root = shared_tmp / "store"
    root.mkdir(mode=0o755)  # root's, not sticky-writable, and no ROOT/alice yet
    proc = hpcckpt_as(alice, ["run", "--interval", "60", "--store", str(root), "--job-id", "x", "--", "true"],
                      cwd=shared_tmp)
    assert proc.returncode == EXIT_STORE, proc.stderr
    assert str(root / "alice") in proc.stderr
    assert "chmod 1777" in proc.stderr and "Traceback" not in proc.stderr


def test_staging_falls_back_to_disk_when_tmpfs_area_is_not_ours(alice: UnixUser, shared_tmp: Path) -> None:
    # A trusted tmpfs area as root made it (0755, root's), with no directory for alice in it:
    # choose_staging as alice must take storage.staging instead of failing.
    tmpfs = shared_tmp / "shm"
    (tmpfs / "hpcckpt-staging").mkdir(parents=True, mode=0o755)
    disk = shared_tmp / "disk"
    disk.mkdir(mode=0o1777)
    disk.chmod(0o1777)
    code = (
        "import sys, json; from pathlib import Path; from hpcckpt.context import current_user; "
        "from hpcckpt.core.pipeline.staging import choose_staging; "
        f"c = choose_staging(current_user(), 'j1', 1000, disk_root=Path({str(disk)!r}), "
        f"tmpfs=Path({str(tmpfs)!r}), mem_available=10**12); print(json.dumps([str(c.root), c.kind]))"
    )
    proc = run_as(alice, [str(venv_bin() / "python"), "-c", code], env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert '"disk"' in proc.stdout and str(disk / "alice" / "j1") in proc.stdout
    assert not (tmpfs / "hpcckpt-staging" / "alice").exists()
