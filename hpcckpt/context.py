"""Who is asking, and where their checkpoints live.

Resolution order for the store root: ``--store``, ``$HPCCKPT_STORE``, the
policy's ``storage.root``, then ``~/.local/share/hpcckpt/store`` (or
``$XDG_DATA_HOME/hpcckpt/store``). Inside it every user has ``ROOT/USER``.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def current_user() -> User:
    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
        return User(pw.pw_name, uid, os.getgid(), pw.pw_dir)
    except KeyError:  # a uid with no passwd entry, as in some containers
        return User(str(uid), uid, os.getgid(), os.environ.get("HOME", "/"))


def user_by_name(name: str) -> User:
    pw = pwd.getpwnam(name)
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def user_by_uid(uid: int) -> User:
    pw = pwd.getpwuid(uid)
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def default_store_root(user: User | None = None) -> Path:
    user = user or current_user()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path(user.home) / ".local" / "share"
    return base / "hpcckpt" / "store"


def resolve_store_root(cli: str | None = None, policy_root: str | None = None) -> Path:
    for cand in (cli, os.environ.get("HPCCKPT_STORE"), policy_root):
        if cand:
            return Path(os.path.expanduser(cand)).absolute()
    return default_store_root()


def resolve_catalog_url(cli: str | None = None, policy_url: str | None = None) -> str | None:
    """A postgresql:// URL or SQLite path; None means the per-user SQLite default."""
    for cand in (cli, os.environ.get("HPCCKPT_CATALOG"), policy_url):
        if cand:
            return cand
    return None


def node_name() -> str:
    """This node's name as the scheduler knows it: ``$SLURMD_NODENAME`` inside Slurm, else the hostname.

    Several Slurm nodes can share one host (and a node's Slurm name often
    differs from its hostname), so catalog rows and logs use Slurm's name.
    """
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()
