"""PostgreSQL row-level security, proved with the real psql client run as alice and bob.

Each test user connects as themself over the Unix socket (peer auth): what
they can see and change is what the server enforces, whatever SQL they type.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcckpt.catalog import pg_security, pg_setup
from hpcckpt.context import User
from hpcckpt.errors import CatalogError
from tests.security import pgpeer
from tests.security.users import UnixUser, run_as

pytestmark = [pytest.mark.postgres, pytest.mark.multiuser]

ROOT = User("root", 0, 0, "/root")


@pytest.fixture(scope="module")
def server(users: dict[str, UnixUser]) -> Iterator[pgpeer.PeerServer]:
    try:
        with pgpeer.catalog_server() as srv:
            _setup_catalog(srv, users)
            yield srv
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _setup_catalog(srv: pgpeer.PeerServer, users: dict[str, UnixUser]) -> None:
    """As root (peer-mapped to the admin role): create the tables, add rows for alice and bob, then lock down."""
    from hpcckpt.catalog.postgres import PostgresCatalog

    cat = PostgresCatalog(srv.url(), ROOT)
    try:
        for name in ("alice", "bob"):
            u = users[name]
            for job in ("100", "200"):
                ckptid = cat.begin(job_id=f"{name}-{job}", uid=u.uid, user=name, node="node1", engine="criu")
                cat.commit(ckptid, path=f"/store/{name}/{job}/ckpt-{ckptid}.hck", size_bytes=10, duration=1.0)
            cat.record_job_event(f"{name}-100", uid=u.uid, event="epilog", detail="ok", node="node1")
    finally:
        cat.close()
    accounts = [(name, users[name].uid) for name in ("alice", "bob")]
    pg_setup.setup_catalog(srv.url(), ROOT, add=accounts)
    # Idempotent: a second run (an admin re-running pg-setup) changes nothing and does not fail.
    report = pg_setup.setup_catalog(srv.url(), ROOT, add=accounts)
    assert report.users == sorted(accounts) and report.role == pg_security.ADMIN_ROLE


def psql(srv: pgpeer.PeerServer, user: UnixUser, sql: str, role: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_as(user, srv.psql_argv(role or user.name, sql), cwd=Path("/"))


def ok(res: subprocess.CompletedProcess[str]) -> list[str]:
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line]


def test_each_user_sees_only_their_rows(server: pgpeer.PeerServer, alice: UnixUser, bob: UnixUser) -> None:
    assert ok(psql(server, alice, "SELECT DISTINCT uid FROM checkpoints")) == [str(alice.uid)]
    assert ok(psql(server, alice, "SELECT count(*) FROM checkpoints")) == ["2"]
    assert ok(psql(server, bob, "SELECT DISTINCT \"user\" FROM checkpoints")) == ["bob"]
    assert ok(psql(server, alice, "SELECT count(*) FROM job_events WHERE uid <> " + str(alice.uid))) == ["0"]
    assert ok(psql(server, alice, "SELECT count(*) FROM checkpoints WHERE job_id LIKE 'bob-%'")) == ["0"]


def test_nobody_changes_or_deletes_another_users_rows(server: pgpeer.PeerServer, alice: UnixUser) -> None:
    assert ok(psql(server, alice, "UPDATE checkpoints SET status = 'deleted' WHERE \"user\" = 'bob' RETURNING 1")) == []
    assert ok(psql(server, alice, "DELETE FROM checkpoints WHERE \"user\" = 'bob' RETURNING 1")) == []
    assert ok(psql(server, alice, "DELETE FROM job_events WHERE uid <> 0 AND job_id LIKE 'bob%' RETURNING 1")) == []


def test_the_server_stamps_the_owner_whatever_the_client_sends(
    server: pgpeer.PeerServer, alice: UnixUser, bob: UnixUser
) -> None:
    # Each statement runs in a transaction rolled back at the end, so other tests' counts hold.
    cols = "(job_id, uid, \"user\", engine, status, created)"
    for uid, name in ((bob.uid, "bob"), (alice.uid, "bob"), (bob.uid, "alice"), (0, "root")):
        res = psql(server, alice, f"BEGIN; INSERT INTO checkpoints {cols} VALUES ('x', {uid}, '{name}', 'criu', "
                                  "'writing', 0) RETURNING uid, \"user\"; ROLLBACK")
        assert ok(res) == [f"{alice.uid}|alice"], (uid, name)
    res = psql(server, alice, f"BEGIN; UPDATE checkpoints SET uid = {bob.uid}, \"user\" = 'bob' "
                              "RETURNING uid, \"user\"; ROLLBACK")
    assert set(ok(res)) == {f"{alice.uid}|alice"}
    res = psql(server, alice, f"BEGIN; INSERT INTO job_events (job_id, uid, event, ts) VALUES ('x', {bob.uid}, 'e', 0) "
                              "RETURNING uid; ROLLBACK")
    assert ok(res) == [str(alice.uid)]
    # Committed for real: the forged row is alice's, and bob never sees it.
    res = psql(server, alice, f"INSERT INTO checkpoints {cols} VALUES ('forged', {bob.uid}, 'bob', 'criu', "
                              "'writing', 0) RETURNING ckptid")
    (ckptid,) = ok(res)
    assert ok(psql(server, bob, "SELECT count(*) FROM checkpoints WHERE job_id = 'forged'")) == ["0"]
    assert ok(psql(server, alice, f"DELETE FROM checkpoints WHERE ckptid = {ckptid} RETURNING uid")) == [str(alice.uid)]


def test_the_owner_cannot_be_stamped_away(server: pgpeer.PeerServer, alice: UnixUser) -> None:
    """The trigger and the policy are the table owner's: a user can neither drop nor disable them."""
    for sql in ("ALTER TABLE checkpoints DISABLE TRIGGER hpcckpt_stamp_owner",
                "DROP TRIGGER hpcckpt_stamp_owner ON checkpoints",
                "ALTER TABLE checkpoints DISABLE ROW LEVEL SECURITY",
                "DROP POLICY hpcckpt_own_rows ON checkpoints",
                "CREATE OR REPLACE FUNCTION public.hpcckpt_session_uid() RETURNS bigint LANGUAGE sql "
                "AS 'SELECT 1::bigint'"):
        res = psql(server, alice, sql)
        assert res.returncode != 0 and ("must be owner" in res.stderr or "permission denied" in res.stderr), (
            sql, res.stderr)


def test_a_shadowing_temp_function_changes_nothing(server: pgpeer.PeerServer, alice: UnixUser, bob: UnixUser) -> None:
    """Every session may create temp objects; the policy and trigger name their function by schema."""
    res = psql(server, alice, f"CREATE FUNCTION pg_temp.hpcckpt_session_uid() RETURNS bigint LANGUAGE sql "
                              f"AS 'SELECT {bob.uid}::bigint'; SET search_path = pg_temp, public; "
                              "SELECT count(*) FROM checkpoints WHERE \"user\" = 'bob'; "
                              "BEGIN; INSERT INTO job_events (job_id, uid, event, ts) VALUES ('t', 0, 'e', 0) "
                              "RETURNING uid; ROLLBACK")
    assert ok(res) == ["0", str(alice.uid)]


def test_own_rows_can_be_written_and_stay_private(server: pgpeer.PeerServer, alice: UnixUser, bob: UnixUser) -> None:
    cols = "(job_id, uid, \"user\", engine, status, created)"
    ids = ok(psql(server, alice, f"INSERT INTO checkpoints {cols} VALUES ('alice-own', {alice.uid}, 'alice', "
                                 "'criu', 'writing', 0) RETURNING ckptid"))
    assert len(ids) == 1 and int(ids[0]) > 0
    assert ok(psql(server, bob, f"SELECT count(*) FROM checkpoints WHERE ckptid = {ids[0]}")) == ["0"]
    assert ok(psql(server, alice, f"DELETE FROM checkpoints WHERE ckptid = {ids[0]} RETURNING 1")) == ["1"]


def test_ckptids_cannot_be_claimed_ahead(server: pgpeer.PeerServer, alice: UnixUser) -> None:
    res = psql(server, alice, f"INSERT INTO checkpoints (ckptid, job_id, uid, \"user\", engine, status, created) "
                              f"VALUES (999999, 'x', {alice.uid}, 'alice', 'criu', 'writing', 0)")
    assert res.returncode != 0 and "permission denied" in res.stderr


def test_identity_cannot_be_switched_inside_a_session(server: pgpeer.PeerServer, alice: UnixUser) -> None:
    res = psql(server, alice, "SET ROLE bob")
    assert res.returncode != 0 and "permission denied" in res.stderr
    res = psql(server, alice, "SET SESSION AUTHORIZATION bob")
    assert res.returncode != 0 and "permission denied" in res.stderr
    res = psql(server, alice, f"SET ROLE {pg_security.USERS_ROLE}; SELECT count(*) FROM checkpoints")
    assert ok(res) == ["2"], "the group role must not widen what alice sees"
    res = psql(server, alice, "SELECT * FROM hpcckpt_user_map")
    assert res.returncode != 0 and "permission denied" in res.stderr
    res = psql(server, alice, "CREATE TABLE public.hpcckpt_user_map2 (role name, uid bigint)")
    assert res.returncode != 0 and "permission denied" in res.stderr


def test_cannot_log_in_as_someone_else(server: pgpeer.PeerServer, alice: UnixUser) -> None:
    for role in ("bob", pg_security.ADMIN_ROLE, "postgres"):
        res = psql(server, alice, "SELECT 1", role=role)
        assert res.returncode != 0 and "authentication failed" in res.stderr, (role, res.stderr)


def test_admin_sees_every_row(server: pgpeer.PeerServer) -> None:
    import psycopg

    with psycopg.connect(server.url(pg_security.ADMIN_ROLE)) as conn:
        (n,) = conn.execute("SELECT count(DISTINCT uid) FROM checkpoints").fetchone()  # type: ignore[misc]
    assert n == 2


def test_hpcckpt_catalog_as_alice_lists_only_hers(server: pgpeer.PeerServer, alice: UnixUser) -> None:
    code = (
        "import json,sys; from hpcckpt.catalog.postgres import PostgresCatalog; from hpcckpt.context import "
        "current_user; c = PostgresCatalog(sys.argv[1], current_user()); "
        "print(json.dumps(sorted({r.uid for r in c.list()}))); c.close()"
    )
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = run_as(alice, [sys.executable, "-c", code, server.url()], env=env, cwd=Path("/"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"[{alice.uid}]"


@pytest.mark.parametrize("name", ["", "pg_monitor", "a\"b", "x" * 64, "bad name", "hpcckpt_admin"])
def test_unsafe_role_names_are_refused(name: str) -> None:
    with pytest.raises(CatalogError):
        pg_security.check_role_name(name)


_TAKE_LEASE = (
    "import sys; from hpcckpt.catalog.postgres import PostgresCatalog; from hpcckpt.context import current_user; "
    "from hpcckpt.core.lease import acquire; from hpcckpt.errors import JobRunningError\n"
    "c = PostgresCatalog(sys.argv[1], current_user())\n"
    "try:\n"
    "    acquire(c, sys.argv[2], options={'interval': sys.argv[3]})\n"
    "    print('taken')\n"
    "except JobRunningError as e:\n"
    "    print('refused', e)\n"
    "finally:\n"
    "    c.close()\n"
)


def test_job_leases_are_private_and_per_user(server: pgpeer.PeerServer, alice: UnixUser, bob: UnixUser) -> None:
    """Alice and bob both name a job "sim": each takes their own lease, sees only it, and cannot touch the other's."""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def take(user: UnixUser, interval: str) -> str:
        res = run_as(user, [sys.executable, "-c", _TAKE_LEASE, server.url(), "sim", interval], env=env, cwd=Path("/"))
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    assert take(alice, "10") == "taken"
    assert take(bob, "20") == "taken", "bob's job is not alice's, whatever its name"
    # The lease-holding processes have exited, so their leases are taken over, each by its own user only.
    assert take(alice, "30") == "taken"
    assert ok(psql(server, alice, "SELECT uid, options FROM job_leases")) == [f"{alice.uid}|{{\"interval\": \"30\"}}"]
    assert ok(psql(server, bob, "SELECT \"user\" FROM job_leases")) == ["bob"]
    # Neither an update nor a claim in bob's name reaches bob's row.
    ok(psql(server, alice, "UPDATE job_leases SET state = 'exited' WHERE \"user\" = 'bob'"))
    ok(psql(server, alice, f"UPDATE job_leases SET uid = {bob.uid}, \"user\" = 'bob'"))
    assert ok(psql(server, bob, "SELECT state, options FROM job_leases")) == ["live|{\"interval\": \"20\"}"]
    assert ok(psql(server, alice, "SELECT \"user\" FROM job_leases")) == ["alice"]
