"""The test users ``alice`` and ``bob``, and running commands as them.

The multi-user tests need real, separate Unix accounts: isolation that is only
checked with a faked uid proves nothing about what the kernel enforces. The
accounts are created once with ``useradd -m`` (idempotent) and left in place,
because deleting users that a parallel test might still be using is worse than
two idle accounts on a CI machine.

Commands run through ``setpriv`` with the target's uid, gid and supplementary
groups and a clean environment, so nothing of root's (HOME, XDG_*, HPCCKPT_*)
leaks into the test user's process.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcckpt.context import User
from hpcckpt.core.security import supplementary_groups
from hpcckpt.errors import PermissionDeniedError

REPO = Path(__file__).resolve().parents[2]
TEST_USERS = ("alice", "bob")


@dataclass(frozen=True)
class UnixUser:
    name: str
    uid: int
    gid: int
    home: Path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A login-like environment for this user, plus ``extra``."""
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": f"{venv_bin()}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
            # The CLI reads these; never inherit root's.
            "HPCCKPT_LOG_FORMAT": "human",
        }
        if extra:
            env.update(extra)
        return env


def venv_bin() -> Path:
    """The bin dir of the interpreter running the tests (the project venv)."""
    return Path(sys.executable).parent


def ensure_user(name: str) -> UnixUser:
    """Create ``name`` with a home dir if missing; return its identity."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if os.geteuid() != 0:
            raise PermissionError(f"user {name!r} does not exist and only root can create it") from None
        # --user-group gives each test user a private group, as on a real
        # cluster, so group bits never accidentally grant cross-user access.
        subprocess.run(
            ["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", name],
            check=True,
            capture_output=True,
        )
        pw = pwd.getpwnam(name)
    home = Path(pw.pw_dir)
    if not home.is_dir():  # an account left over without its home
        home.mkdir(mode=0o700, parents=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
    return UnixUser(pw.pw_name, pw.pw_uid, pw.pw_gid, home)


def unreachable_path_component(path: Path, user: UnixUser) -> Path | None:
    """The first directory on ``path`` that ``user`` cannot search, or None.

    The test users run the venv's ``hpcckpt`` straight from the repository,
    so every directory above it must be world-searchable (o+x) and the files
    world-readable. This reports the first one that is not, for a clear skip.
    """
    cur = Path("/")
    for part in path.resolve().parts[1:]:
        cur = cur / part
        try:
            st = cur.stat()
        except OSError:
            return cur
        if stat.S_ISDIR(st.st_mode):
            if st.st_uid == user.uid:
                continue
            if not st.st_mode & stat.S_IXOTH:
                return cur
        elif not st.st_mode & stat.S_IROTH and st.st_uid != user.uid:
            return cur
    return None


def as_user_argv(user: UnixUser, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run with ``user``'s uid, gid and groups."""
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [
        setpriv,
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--init-groups",
        # A user process must not keep root's capabilities by inheritance.
        "--inh-caps=-all",
        "--",
        *argv,
    ]


def run_as(
    user: UnixUser,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` and return the finished process (never raises on rc)."""
    return subprocess.run(
        as_user_argv(user, argv),
        env=user.env(env),
        cwd=str(cwd or user.home),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )


def hpcckpt_as(
    user: UnixUser,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run the venv's ``hpcckpt`` CLI as ``user``."""
    argv = [str(venv_bin() / "python"), "-m", "hpcckpt", *args]
    extra = {"PYTHONPATH": str(REPO), **(env or {})}
    return run_as(user, argv, env=extra, cwd=cwd, timeout=timeout)


def popen_credentials(user: User) -> dict[str, Any]:
    """Keyword arguments that make ``subprocess.Popen`` run the child as ``user``.

    Python sets the ids between fork and exec in C, which is safe in a
    threaded parent (a ``preexec_fn`` is not). Only root may switch; for the
    user themself this returns no switch at all.
    """
    if os.geteuid() == user.uid and os.getegid() == user.gid:
        return {}
    if os.geteuid() != 0:
        raise PermissionDeniedError(
            f"cannot run as {user.name} (uid {user.uid}) without root",
            hint="only root can start a restore on behalf of another user",
        )
    return {"user": user.uid, "group": user.gid, "extra_groups": supplementary_groups(user)}
