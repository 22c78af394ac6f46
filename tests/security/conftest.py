"""Fixtures for the multi-user security tests: real users, shared dirs, real CRIU dumps."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.users import TEST_USERS, UnixUser, ensure_user, unreachable_path_component, venv_bin

CRIU = Path(os.environ.get("HPCCKPT_CRIU", "/usr/local/sbin/criu"))


@pytest.fixture(scope="session")
def users() -> dict[str, UnixUser]:
    """``alice`` and ``bob``, created if missing; skips when that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("multi-user tests run as root (they create users and act as them)")
    found = {name: ensure_user(name) for name in TEST_USERS}
    blocked = unreachable_path_component(venv_bin() / "python", found["alice"])
    if blocked is not None:
        pytest.fail(
            f"{blocked} is not readable/searchable by other users, so alice cannot run hpcckpt from the venv; "
            f"run 'chmod o+rx {blocked}' or set HPCCKPT_VENV to a world-readable location (see docs/security.md)"
        )
    return found


@pytest.fixture
def alice(users: dict[str, UnixUser]) -> UnixUser:
    return users["alice"]


@pytest.fixture
def bob(users: dict[str, UnixUser]) -> UnixUser:
    return users["bob"]


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp that the test users can traverse.

    pytest's tmp_path lives under /tmp/pytest-of-root (0700), where alice and
    bob cannot reach anything.
    """
    path = Path(tempfile.mkdtemp(prefix="hpcckpt-sec-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _criu_usable() -> bool:
    return CRIU.is_file() and os.access(CRIU, os.X_OK)


def criu_dump_as(user: UnixUser, dest: Path) -> Path:
    """Start ``sleep`` as ``user`` in its own session, dump it with criu --unprivileged as ``user``.

    Returns ``dest`` (a 0700 dir owned by the user, holding the CRIU images).
    The process is killed by the dump (no --leave-running).
    """
    if not _criu_usable():
        pytest.skip(f"criu not found at {CRIU}")
    dest.mkdir(mode=0o700)
    os.chown(dest, user.uid, user.gid)
    from tests.security.users import as_user_argv

    # no_new_privs: this machine's capability bounding set lacks
    # CAP_SYS_RESOURCE, and CRIU's restorer must then drop it from the
    # restored task's bounding set, which needs CAP_SETPCAP, which an
    # unprivileged restore does not have. With no_new_privs recorded in the
    # image CRIU lets the bit stay (it can never be gained back anyway).
    proc = subprocess.Popen(
        as_user_argv(user, ["setpriv", "--no-new-privs", "setsid", "sleep", "600"]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=user.env(),
        cwd=str(user.home),
    )
    try:
        # setpriv execs setsid which execs sleep: the pid stays the same.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
            except FileNotFoundError:
                comm = ""
            if comm == "sleep":
                break
            time.sleep(0.02)
        res = subprocess.run(
            as_user_argv(
                user,
                [str(CRIU), "dump", "--unprivileged", "-t", str(proc.pid), "-D", str(dest), "-o", "dump.log"],
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=user.env(),
            check=False,
        )
        if res.returncode != 0:
            log = (dest / "dump.log").read_text(errors="replace")[-2000:] if (dest / "dump.log").exists() else ""
            pytest.fail(f"criu dump as {user.name} failed ({res.returncode}): {res.stderr}\n{log}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    return dest


@pytest.fixture
def alice_dump(alice: UnixUser, shared_tmp: Path) -> Path:
    """A real CRIU dump of a process that ran as alice."""
    return criu_dump_as(alice, shared_tmp / "alice-dump")
