"""The root-run Slurm hooks against a hostile user: planted symlinks, odd job ids and user names."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from hpcckpt.cluster import hooks
from hpcckpt.context import User, user_by_name
from hpcckpt.errors import SlurmError
from hpcckpt.fs.safe import is_safe_component
from hpcckpt.slurm.env import SlurmEnv
from tests.security.users import UnixUser, run_as

pytestmark = pytest.mark.multiuser


class QuietSlurm:
    """A Slurm that knows the job and does nothing else: the hooks' only collaborator here."""

    def show_job(self, job_id: str) -> dict[str, str]:
        return {"JobId": job_id}

    def batch_script(self, job_id: str) -> str:
        return "#!/bin/sh\nexec hpcckpt run -- ./sim\n"

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise SlurmError("not used in these tests")

    def requeue(self, job_id: str, *, hold: bool = False) -> None:
        self._refuse()

    def update_job(self, job_id: str, **fields: str) -> None:
        self._refuse()

    def cancel(self, job_id: str) -> None:
        self._refuse()

    def submit(self, script: str | Path, options: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
        raise SlurmError("not used in these tests")

    def drain(self, node: str, reason: str) -> None:
        self._refuse()

    def node_state(self, node: str) -> str:
        return "IDLE"

    def hostnames(self, expr: str) -> list[str]:
        return [expr]

    def show_node(self, node: str) -> dict[str, str]:
        return {"NodeName": node, "State": "IDLE"}

    def running_jobs(self, node: str) -> list[str]:
        return []

    def all_nodes(self) -> list[dict[str, str]]:
        return []

    def signal_batch(self, job_id: str, signal: str) -> None:
        self._refuse()

    def is_operator(self, user: str) -> bool:
        return False


@pytest.fixture
def site(shared_tmp: Path) -> tuple[Path, Path]:
    """A store root the admin made world-writable with the sticky bit (the riskiest legal setup),
    and a root-owned victim directory elsewhere."""
    root = shared_tmp / "store"
    root.mkdir()
    root.chmod(0o1777)
    victim = shared_tmp / "victim"
    victim.mkdir(mode=0o755)
    (victim / "secret").write_text("root's file\n")
    return root, victim


def deps_for(root: Path, lookup: object = None) -> hooks.HookDeps:
    deps = hooks.HookDeps(slurm=QuietSlurm(), store_root=root)
    if lookup is not None:
        deps.user_lookup = lookup  # type: ignore[assignment]
    return deps


def env_for(user: UnixUser | User, job_id: str) -> SlurmEnv:
    return SlurmEnv(job_id=job_id, context="prolog_slurmd", node="node1", uid=user.uid, gid=user.gid,
                    user=user.name)


def snapshot(d: Path) -> dict[str, tuple[int, int, bytes | None]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(d):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(d))] = (st.st_uid, st.st_mode, p.read_bytes() if p.is_file() else None)
    return out


def test_planted_job_dir_symlink_is_not_followed(bob: UnixUser, site: tuple[Path, Path]) -> None:
    root, victim = site
    before = snapshot(victim)
    assert hooks.prolog(env_for(bob, "1"), deps_for(root)) == 0  # makes ROOT/bob, owned by bob
    assert (root / "bob").stat().st_uid == bob.uid
    res = run_as(bob, ["ln", "-s", str(victim), str(root / "bob" / "4242")])
    assert res.returncode == 0, res.stderr
    assert hooks.prolog(env_for(bob, "4242"), deps_for(root)) == 0  # a hook never fails the job
    assert (root / "bob" / "4242").is_symlink()
    assert snapshot(victim) == before, "root wrote through bob's symlink"


def test_planted_job_info_symlink_is_replaced_not_written_through(bob: UnixUser, site: tuple[Path, Path]) -> None:
    root, victim = site
    assert hooks.prolog(env_for(bob, "7"), deps_for(root)) == 0
    info = root / "bob" / "7" / hooks.JOB_INFO_FILE
    info.unlink()
    res = run_as(bob, ["ln", "-s", str(victim / "secret"), str(info)])
    assert res.returncode == 0, res.stderr
    assert hooks.prolog(env_for(bob, "7"), deps_for(root)) == 0
    assert (victim / "secret").read_text() == "root's file\n"
    assert not info.is_symlink() and info.stat().st_uid == bob.uid
    assert oct(info.stat().st_mode & 0o777) == oct(0o600)


def test_user_dir_squatted_by_another_user_is_refused(alice: UnixUser, bob: UnixUser, site: tuple[Path, Path]) -> None:
    root, victim = site
    before = snapshot(victim)
    # bob gets to the sticky store root first and squats alice's name, as a link and as a dir.
    res = run_as(bob, ["ln", "-s", str(victim), str(root / "alice")])
    assert res.returncode == 0, res.stderr
    assert hooks.prolog(env_for(alice, "99"), deps_for(root)) == 0
    assert snapshot(victim) == before
    (root / "alice").unlink()
    res = run_as(bob, ["mkdir", str(root / "alice")])
    assert res.returncode == 0, res.stderr
    assert hooks.prolog(env_for(alice, "99"), deps_for(root)) == 0
    assert list((root / "alice").iterdir()) == [], "root created alice's job dir inside bob's directory"


ODD_JOB_IDS = ["../../victim", "a/b", "..", ".", "x\ny", "$(touch /tmp/pwned)", "-rf", "é ünï", "a" * 300, " ", "a\0b"]


@pytest.mark.parametrize("job_id", ODD_JOB_IDS, ids=lambda j: repr(j)[:20])
def test_odd_job_ids_stay_inside_the_users_dir(bob: UnixUser, site: tuple[Path, Path], job_id: str) -> None:
    root, victim = site
    before_victim = snapshot(victim)
    assert hooks.prolog(env_for(bob, job_id), deps_for(root)) == 0
    assert snapshot(victim) == before_victim
    assert sorted(p.name for p in root.iterdir()) in ([], ["bob"])
    for p in (root / "bob").iterdir() if (root / "bob").exists() else []:
        assert p.parent == root / "bob"
        assert "/" not in p.name and p.name not in (".", "..") and "\n" not in p.name
        assert p.stat().st_uid == bob.uid and not p.is_symlink()
    assert not Path("/tmp/pwned").exists()


ODD_USER_NAMES = ["../victim", "..", "x\ny", "dom\\user", "user@realm"]
# Names that are no single path component at all: Store refuses them, but
# hooks.job_dir() does not check yet (reported to the Slurm hooks' owner).
UNCHECKED_BY_HOOKS = [".", "a/b", ""]


def _odd_user_case(bob: UnixUser, site: tuple[Path, Path], name: str) -> None:
    root, victim = site
    before = snapshot(victim)
    evil = User(name, bob.uid, bob.gid, "/nonexistent")
    assert hooks.prolog(env_for(evil, "5"), deps_for(root, lambda uid: evil)) == 0
    assert snapshot(victim) == before
    made = [p.name for p in root.iterdir()]
    if is_safe_component(name):
        # An odd but legal name gets exactly its own dir, with the job inside.
        assert made == [name]
        assert [p.name for p in (root / name).iterdir()] == ["5"]
    else:
        assert made == [], f"a user named {name!r} made root create {made} in the store root"


@pytest.mark.parametrize("name", ODD_USER_NAMES, ids=repr)
def test_odd_user_names_never_leave_their_dir(bob: UnixUser, site: tuple[Path, Path], name: str) -> None:
    _odd_user_case(bob, site, name)


@pytest.mark.parametrize("name", UNCHECKED_BY_HOOKS, ids=repr)
def test_non_component_user_names_are_refused(bob: UnixUser, site: tuple[Path, Path], name: str) -> None:
    _odd_user_case(bob, site, name)


def test_real_user_lookup_matches_passwd(bob: UnixUser) -> None:
    assert user_by_name("bob").uid == bob.uid
