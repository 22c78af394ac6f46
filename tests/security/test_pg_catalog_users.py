"""A site PostgreSQL catalog, end to end: root sets it up, alice and bob checkpoint and list as themselves.

Everything goes through the real CLI and the real server with peer
authentication: the server learns each client's Unix user from the socket,
so what alice and bob can do here is what row-level security lets them do.
One URL serves everybody (``postgresql:///hpcckpt?host=SOCK``): users
connect as their own role, root as the admin role.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcckpt.catalog import pg_security
from hpcckpt.catalog.schema import SCHEMA_VERSION
from hpcckpt.fs import safe as fsutil
from tests.security import pgpeer
from tests.security.users import REPO, UnixUser, hpcckpt_as, run_as, venv_bin

pytestmark = [pytest.mark.postgres, pytest.mark.multiuser]

NOT_SET_UP = "hpcckpt_new"  # a database the admin created but never ran pg-setup on

# Run as a user: publish one real image the way the runner does (row, image, fsync, rename, commit).
PUBLISH = """
import sys
from pathlib import Path
from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.image import ImageMeta, pack_dir
from hpcckpt.store.images import Store
url, root, src, job = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
me = current_user()
cat = open_catalog(url, root, me)
with Store(root, me).publish(cat, job_id=job, engine="criu", node="node1") as pub:
    pack_dir(src, pub.file, ImageMeta(ckptid=pub.ckptid, job_id=job, engine="criu", uid=me.uid, gid=me.gid,
                                      user=me.name))
print(pub.ckptid)
cat.close()
"""

# Run as a user: every catalog call a job's life makes, on their own rows, printed as JSON.
INTERFACE = """
import json, sys
from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.errors import NotFoundError, PermissionDeniedError
url, other_ckptid, other_uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
me = current_user()
cat = open_catalog(url, None, me)
out = {"version": cat.schema_version(), "role": cat.describe()["role"]}
a = cat.begin(job_id="iface", uid=me.uid, user=me.name, node="n1", engine="criu", meta={"k": 1})
cat.commit(a, path="/s/a", size_bytes=5, duration=0.5)
b = cat.begin(job_id="iface", uid=me.uid, user=me.name, node="n1", engine="criu", parent=a, requeue_count=1)
cat.fail(b, "writer died")
c = cat.begin(job_id="iface", uid=me.uid, user=me.name, node="n1", engine="criu")
cat.commit(c, path="/s/c", size_bytes=7, duration=0.1)
cat.record_resume(a, resumed_by="77", new_job_id="78")
cat.record_job_event("iface", uid=me.uid, event="requeued", detail="preempted", node="n1")
out["latest"] = cat.latest("iface").ckptid
out["committed"] = [r.ckptid for r in cat.committed("iface")]
cat.mark_deleted(c)
out["latest_after_delete"] = cat.latest("iface").ckptid
out["list"] = [(r.ckptid, r.status.value, r.uid, r.user) for r in cat.list("iface", include_deleted=True)]
rec = cat.get(a)
out["a"] = [rec.resumed_by, rec.new_job_id, rec.meta.get("k")]
out["failed_error"] = cat.get(b).error
out["events"] = [(e["event"], e["uid"]) for e in cat.job_events("iface")]
ids = (a, b, c)
out["ids_increase"] = list(ids) == sorted(ids) and min(ids) > 0
out["other_get"] = repr(cat.get(other_ckptid))
for name, call in (("commit", lambda: cat.commit(other_ckptid, path="/x", size_bytes=1, duration=0)),
                   ("delete", lambda: cat.mark_deleted(other_ckptid))):
    try:
        call()
        out[name] = "allowed"
    except NotFoundError:
        out[name] = "not found"
try:
    cat.begin(job_id="x", uid=other_uid, user="someone", node="n1", engine="criu")
    out["begin_other"] = "allowed"
except PermissionDeniedError:
    out["begin_other"] = "refused"
cat.close()
print(json.dumps(out))
"""


def hpcckpt_root(args: list[str]) -> subprocess.CompletedProcess[str]:
    """The real CLI as root, with a clean environment (nothing of the test runner's HPCCKPT_*)."""
    env = {"PATH": f"{venv_bin()}:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO),
           "HOME": "/root", "HPCCKPT_LOG_FORMAT": "human"}
    return subprocess.run([sys.executable, "-m", "hpcckpt", *args], env=env, cwd="/", capture_output=True,
                          text=True, timeout=120, check=False)


def ok_json(res: subprocess.CompletedProcess[str]) -> Any:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def site(users: dict[str, UnixUser]) -> Iterator[tuple[pgpeer.PeerServer, dict[str, Any]]]:
    """A server set up by ``hpcckpt catalog pg-setup`` as root, and its JSON report."""
    try:
        with pgpeer.catalog_server((pgpeer.DATABASE, NOT_SET_UP)) as srv:
            report = ok_json(hpcckpt_root(["catalog", "pg-setup", "--url", srv.url(), "--add-user", "alice",
                                           "--add-user", "bob", "--json"]))
            yield srv, report
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def published(site: tuple[pgpeer.PeerServer, dict[str, Any]], users: dict[str, UnixUser],
              ) -> Iterator[tuple[Path, dict[str, list[int]]]]:
    """(store root, {user: ckptids}): alice and bob each published two real checkpoints of job 300."""
    srv, _ = site
    base = Path(tempfile.mkdtemp(prefix="hpcckpt-sec-", dir="/tmp"))  # users must traverse it: not tmp_path
    base.chmod(0o755)
    try:
        yield _publish_all(srv, users, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _publish_all(srv: pgpeer.PeerServer, users: dict[str, UnixUser], base: Path) -> tuple[Path, dict[str, list[int]]]:
    root = base / "store"
    root.mkdir(mode=0o755)
    ids: dict[str, list[int]] = {}
    for name in ("alice", "bob"):
        u = users[name]
        fsutil.ensure_private_dir(root / name, u.uid, u.gid, base=root)  # what the prolog does
        src = base / f"{name}-src"
        src.mkdir(mode=0o700)
        os.chown(src, u.uid, u.gid)
        assert run_as(u, ["sh", "-c", f"echo {name}-memory > {src}/pages-1.img"]).returncode == 0
        for _ in range(2):
            res = run_as(u, [sys.executable, "-c", PUBLISH, srv.url(), str(root), str(src), "300"],
                         env={"PYTHONPATH": str(REPO)}, cwd=Path("/"))
            assert res.returncode == 0, res.stderr
            ids.setdefault(name, []).append(int(res.stdout))
    return root, ids


def env_for(srv: pgpeer.PeerServer, root: Path, database: str = pgpeer.DATABASE) -> dict[str, str]:
    return {"HPCCKPT_CATALOG": srv.url(database=database), "HPCCKPT_STORE": str(root)}


def test_pg_setup_creates_the_schema_and_maps_the_users(
    site: tuple[pgpeer.PeerServer, dict[str, Any]], alice: UnixUser, bob: UnixUser
) -> None:
    srv, report = site
    assert report["schema_version"] == SCHEMA_VERSION and report["migrated_from"] == 0
    assert report["role"] == pg_security.ADMIN_ROLE and report["rls"] is True
    assert report["users"] == [{"user": "alice", "uid": alice.uid}, {"user": "bob", "uid": bob.uid}]
    assert f"local  {pgpeer.DATABASE}  all  peer map=hpcckpt" in report["pg_hba"]
    assert f"hpcckpt  root  {pg_security.ADMIN_ROLE}" in report["pg_ident"]
    # Re-running is safe and says what is there, as text.
    res = hpcckpt_root(["catalog", "pg-setup", "--url", srv.url()])
    assert res.returncode == 0, res.stderr
    assert f"schema version {SCHEMA_VERSION}, row-level security on" in res.stdout
    assert f"alice={alice.uid}, bob={bob.uid}" in res.stdout and "peer map=hpcckpt" in res.stdout


def test_each_user_publishes_and_lists_only_their_own(
    site: tuple[pgpeer.PeerServer, dict[str, Any]], published: tuple[Path, dict[str, list[int]]],
    alice: UnixUser, bob: UnixUser,
) -> None:
    srv, _ = site
    root, ids = published
    for user in (alice, bob):
        rows = ok_json(hpcckpt_as(user, ["list", "--json"], env=env_for(srv, root), cwd=Path("/")))
        assert [r["ckptid"] for r in rows] == ids[user.name]
        assert {(r["uid"], r["user"], r["status"]) for r in rows} == {(user.uid, user.name, "committed")}
        for r in rows:  # the image is where the row says, private to its user
            st = os.stat(r["path"])
            assert (st.st_uid, st.st_mode & 0o777) == (user.uid, 0o600)
        rows = ok_json(hpcckpt_as(user, ["list", "300", "--json"], env=env_for(srv, root), cwd=Path("/")))
        assert [r["ckptid"] for r in rows] == ids[user.name]
        res = hpcckpt_as(user, ["list"], env=env_for(srv, root), cwd=Path("/"))
        assert res.returncode == 0 and res.stdout.count("committed") == 2, res.stderr
    # Root, with the very same URL, is the admin and sees both.
    rows = ok_json(hpcckpt_root(["list", "--json", "--catalog", srv.url(), "--store", str(root)]))
    assert sorted(r["ckptid"] for r in rows) == sorted(ids["alice"] + ids["bob"])
    info = ok_json(hpcckpt_as(alice, ["catalog", "info", "--json"], env=env_for(srv, root), cwd=Path("/")))
    assert info[0]["backend"] == "postgresql" and info[0]["role"] == "alice"
    assert info[0]["schema_version"] == SCHEMA_VERSION


def test_psql_cannot_read_or_change_the_other_users_checkpoints(
    site: tuple[pgpeer.PeerServer, dict[str, Any]], published: tuple[Path, dict[str, list[int]]],
    bob: UnixUser,
) -> None:
    srv, _ = site
    _, ids = published
    theirs = ", ".join(str(i) for i in ids["alice"])
    for sql, want in ((f"SELECT count(*) FROM checkpoints WHERE ckptid IN ({theirs})", ["0"]),
                      (f"UPDATE checkpoints SET status = 'deleted' WHERE ckptid IN ({theirs}) RETURNING 1", []),
                      (f"DELETE FROM checkpoints WHERE ckptid IN ({theirs}) RETURNING 1", [])):
        res = run_as(bob, srv.psql_argv("bob", sql), cwd=Path("/"))
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == want, sql
    rows = ok_json(hpcckpt_root(["list", "--json", "--user", "alice", "--catalog", srv.url(), "--store",
                                 str(published[0])]))
    assert {(r["ckptid"], r["status"]) for r in rows} == {(i, "committed") for i in ids["alice"]}


def test_the_whole_interface_works_for_a_user_role(
    site: tuple[pgpeer.PeerServer, dict[str, Any]], published: tuple[Path, dict[str, list[int]]],
    alice: UnixUser, bob: UnixUser,
) -> None:
    srv, _ = site
    _, ids = published
    res = run_as(alice, [sys.executable, "-c", INTERFACE, srv.url(), str(ids["bob"][0]), str(bob.uid)],
                 env={"PYTHONPATH": str(REPO)}, cwd=Path("/"))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    a, _, c = (row[0] for row in out["list"])
    assert out["version"] == SCHEMA_VERSION and out["role"] == "alice"
    assert out["latest"] == c and out["committed"] == [c, a] and out["latest_after_delete"] == a
    assert [row[1:] for row in out["list"]] == [["committed", alice.uid, "alice"], ["failed", alice.uid, "alice"],
                                                ["deleted", alice.uid, "alice"]]
    assert out["a"] == ["77", "78", 1] and out["failed_error"] == "writer died"
    assert out["events"] == [["requeued", alice.uid]] and out["ids_increase"] is True
    # bob's checkpoint does not exist as far as alice's role can tell.
    assert out["other_get"] == "None" and out["commit"] == "not found" and out["delete"] == "not found"
    assert out["begin_other"] == "refused"


def test_a_catalog_behind_tells_the_user_to_ask_the_admin(
    site: tuple[pgpeer.PeerServer, dict[str, Any]], alice: UnixUser, shared_tmp: Path
) -> None:
    srv, _ = site
    res = hpcckpt_as(alice, ["list", "--json"], env=env_for(srv, shared_tmp, NOT_SET_UP), cwd=Path("/"), timeout=60)
    assert res.returncode == 6, res.stderr
    assert "schema version 0" in res.stderr and "may not upgrade it" in res.stderr
    assert "hpcckpt catalog pg-setup" in res.stderr
    # ... and alice changed nothing there.
    out = pgpeer.superuser_sql(srv, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", db=NOT_SET_UP)
    assert out.split() == ["0"]


def test_only_the_admin_may_run_pg_setup(site: tuple[pgpeer.PeerServer, dict[str, Any]], alice: UnixUser) -> None:
    srv, _ = site
    res = hpcckpt_as(alice, ["catalog", "pg-setup", "--url", srv.url(), "--add-user", "alice"], cwd=Path("/"))
    assert res.returncode == 6 and "does not own the catalog's tables" in res.stderr, res.stderr


def test_removed_user_is_refused_with_a_hint_and_keeps_rows_for_root(
    site: tuple[pgpeer.PeerServer, dict[str, Any]], published: tuple[Path, dict[str, list[int]]], bob: UnixUser,
) -> None:
    srv, _ = site
    root, ids = published
    report = ok_json(hpcckpt_root(["catalog", "pg-setup", "--url", srv.url(), "--remove-user", "bob", "--json"]))
    try:
        assert report["removed"] == ["bob"] and [u["user"] for u in report["users"]] == ["alice"]
        # Refused at once (not retried for minutes), saying what to do.
        res = hpcckpt_as(bob, ["list", "--json"], env=env_for(srv, root), cwd=Path("/"), timeout=60)
        assert res.returncode == 6 and "pg-setup" in res.stderr, res.stderr
        rows = ok_json(hpcckpt_root(["list", "--json", "--catalog", srv.url(), "--store", str(root)]))
        assert {r["ckptid"] for r in rows} >= set(ids["bob"])
    finally:
        ok_json(hpcckpt_root(["catalog", "pg-setup", "--url", srv.url(), "--add-user", "bob", "--json"]))
    rows = ok_json(hpcckpt_as(bob, ["list", "--json"], env=env_for(srv, root), cwd=Path("/")))
    assert [r["ckptid"] for r in rows] == ids["bob"]
