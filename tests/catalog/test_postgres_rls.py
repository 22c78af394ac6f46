"""The PostgreSQL catalog for ordinary user roles under row-level security, on the real test server.

The session server trusts every local connection, so a test can connect as
any role by naming it in the URL: what is proved here is what the *server*
lets each role do (the peer-authenticated, real-Unix-user version of these
checks is tests/security/test_pg_catalog_users.py). The shared catalog and
store tests are re-run below as such a role: the same suite, through RLS.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from hpcckpt.catalog import Catalog, pg_security, pg_setup, postgres
from hpcckpt.catalog.postgres import PostgresCatalog, session_role
from hpcckpt.catalog.schema import POSTGRES_MIGRATIONS, SCHEMA_VERSION
from hpcckpt.context import User
from hpcckpt.errors import CatalogError, CatalogVersionError
from tests.catalog.test_catalog import (
    test_commit_refuses_non_writing_and_unknown,
    test_job_events,
    test_latest_is_newest_committed_only,
    test_list_filters_and_order,
    test_row_fields_round_trip,
)
from tests.catalog.test_store import (
    test_hostile_job_ids_stay_inside_the_user_dir,
    test_publish_commits_durable_private_image,
    test_publish_failure_leaves_nothing_and_keeps_previous,
)
from tests.pgserver import PgServer

pytestmark = pytest.mark.postgres

# Synthetic identities: the catalog trusts the role, not the passwd file, so no Unix account is needed.
ALICE = User("rls_alice", 60001, 60001, "/nonexistent")
BOB = User("rls_bob", 60002, 60002, "/nonexistent")
ROOT = User("root", 0, 0, "/root")
_dbs = itertools.count(1)

# Collected here again, now run as ALICE's role through row-level security.
__all__ = [
    "test_commit_refuses_non_writing_and_unknown",
    "test_hostile_job_ids_stay_inside_the_user_dir",
    "test_job_events",
    "test_latest_is_newest_committed_only",
    "test_list_filters_and_order",
    "test_publish_commits_durable_private_image",
    "test_publish_failure_leaves_nothing_and_keeps_previous",
    "test_row_fields_round_trip",
]


def role_url(server: PgServer, db: str, role: str) -> str:
    return f"postgresql://{role}@127.0.0.1:{server.port}/{db}"


def new_database(server: PgServer) -> str:
    """An empty database owned by the (non-superuser) admin role, as a site sets one up."""
    name = f"hpcckpt_rls{next(_dbs)}"
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (pg_security.ADMIN_ROLE,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE").format(sql.Identifier(pg_security.ADMIN_ROLE)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(pg_security.ADMIN_ROLE)))
    return name


@pytest.fixture
def rls_db(pg_server: PgServer) -> str:
    """A catalog set up by ``setup_catalog`` with ALICE and BOB mapped."""
    db = new_database(pg_server)
    pg_setup.setup_catalog(role_url(pg_server, db, pg_security.ADMIN_ROLE), ROOT,
                              add=[(ALICE.name, ALICE.uid), (BOB.name, BOB.uid)])
    return db


@pytest.fixture
def me() -> User:
    return ALICE


@pytest.fixture
def cat(pg_server: PgServer, rls_db: str) -> Iterator[Catalog]:
    c = PostgresCatalog(role_url(pg_server, rls_db, ALICE.name), ALICE)
    yield c
    c.close()


def test_the_connection_role_comes_from_the_url_then_root_gets_the_admin() -> None:
    assert session_role({}, euid=0, environ={}) == pg_security.ADMIN_ROLE
    assert session_role({"user": "alice"}, euid=0, environ={}) is None
    assert session_role({}, euid=0, environ={"PGUSER": "ops"}) is None
    assert session_role({}, euid=1001, environ={}) is None


def test_users_are_isolated_by_the_server(pg_server: PgServer, rls_db: str) -> None:
    a = PostgresCatalog(role_url(pg_server, rls_db, ALICE.name), ALICE)
    b = PostgresCatalog(role_url(pg_server, rls_db, BOB.name), BOB)
    admin = PostgresCatalog(role_url(pg_server, rls_db, pg_security.ADMIN_ROLE), ROOT)
    try:
        ca = a.begin(job_id="1", uid=ALICE.uid, user=ALICE.name, node="n", engine="criu")
        cb = b.begin(job_id="1", uid=BOB.uid, user=BOB.name, node="n", engine="criu")
        assert [r.ckptid for r in a.list()] == [ca] and [r.ckptid for r in b.list()] == [cb]
        assert {r.ckptid for r in admin.list()} == {ca, cb}
        # Root acting for a user (the hooks) writes that user's uid as given.
        cr = admin.begin(job_id="1", uid=ALICE.uid, user=ALICE.name, node="n", engine="criu")
        assert [r.ckptid for r in a.list()] == [ca, cr]
        # Past hpcckpt's own uid filter, straight SQL as alice still sees only hers.
        with psycopg.connect(role_url(pg_server, rls_db, ALICE.name)) as conn:
            assert conn.execute("SELECT array_agg(ckptid ORDER BY ckptid) FROM checkpoints").fetchone() == ([ca, cr],)
    finally:
        for c in (a, b, admin):
            c.close()


def test_a_user_role_never_creates_the_schema(pg_server: PgServer) -> None:
    db = new_database(pg_server)
    with psycopg.connect(role_url(pg_server, db, pg_security.ADMIN_ROLE), autocommit=True) as conn:
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rls_plain') "
                     "THEN CREATE ROLE rls_plain LOGIN; END IF; END $$")
    with pytest.raises(CatalogError, match=r"schema version 0, this hpcckpt needs \d+, and role rls_plain may not "
                                           r"upgrade it") as err:
        PostgresCatalog(role_url(pg_server, db, "rls_plain"), User("rls_plain", 60003, 60003, "/"))
    assert err.value.hint and "hpcckpt catalog pg-setup" in err.value.hint
    with psycopg.connect(role_url(pg_server, db, pg_security.ADMIN_ROLE)) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
    # Once the admin has created it, a role with no grants is told the same, not shown a raw SQL error.
    PostgresCatalog(role_url(pg_server, db, pg_security.ADMIN_ROLE), ROOT).close()
    with pytest.raises(CatalogError, match="role rls_plain may not read the catalog") as err:
        PostgresCatalog(role_url(pg_server, db, "rls_plain"), User("rls_plain", 60003, 60003, "/"))
    assert err.value.hint and "--add-user rls_plain" in err.value.hint


def test_a_user_role_is_refused_a_newer_schema(pg_server: PgServer, rls_db: str) -> None:
    with psycopg.connect(role_url(pg_server, rls_db, pg_security.ADMIN_ROLE), autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(CatalogVersionError, match="newer than this hpcckpt"):
        PostgresCatalog(role_url(pg_server, rls_db, ALICE.name), ALICE)


def test_a_wrong_uid_mapping_is_refused_before_any_write(pg_server: PgServer, rls_db: str) -> None:
    liar = User(ALICE.name, ALICE.uid + 100, ALICE.gid, "/")
    with pytest.raises(CatalogError, match=rf"mapped to uid {ALICE.uid}, but hpcckpt runs for rls_alice "
                                           rf"\(uid {liar.uid}\)"):
        PostgresCatalog(role_url(pg_server, rls_db, ALICE.name), liar)


def test_a_role_without_a_mapping_is_refused(pg_server: PgServer, rls_db: str) -> None:
    with psycopg.connect(role_url(pg_server, rls_db, pg_security.ADMIN_ROLE), autocommit=True) as conn:
        conn.execute(f"DELETE FROM {pg_security.MAP_TABLE} WHERE role = %s", (BOB.name,))
    with pytest.raises(CatalogError, match="role rls_bob has no uid in the catalog's user map"):
        PostgresCatalog(role_url(pg_server, rls_db, BOB.name), BOB)


def test_rebuild_style_inserts_are_for_the_admin_with_a_clear_error(cat: Catalog) -> None:
    from hpcckpt.catalog import CkptRecord, Status

    rec = CkptRecord(ckptid=999, job_id="r", uid=ALICE.uid, user=ALICE.name, engine="criu",
                     status=Status.COMMITTED, path="/r", size_bytes=1, created=1.0)
    with pytest.raises(CatalogError, match="permission denied") as err:
        cat.insert_records([rec])
    assert err.value.hint and pg_security.ADMIN_ROLE in err.value.hint


def test_a_migration_keeps_users_access(pg_server: PgServer, rls_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema upgrade run by the admin re-applies the grants, so users can use new columns at once."""
    nxt = SCHEMA_VERSION + 1
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", nxt)
    monkeypatch.setattr(postgres, "POSTGRES_MIGRATIONS",
                        [*POSTGRES_MIGRATIONS, (nxt, ["ALTER TABLE checkpoints ADD COLUMN note TEXT"])])
    with pytest.raises(CatalogError, match=f"needs {nxt}, and role rls_alice may not upgrade it"):
        PostgresCatalog(role_url(pg_server, rls_db, ALICE.name), ALICE)
    admin = PostgresCatalog(role_url(pg_server, rls_db, pg_security.ADMIN_ROLE), ROOT)
    assert admin.migrated_from == SCHEMA_VERSION and admin.schema_version() == nxt
    admin.close()
    a = PostgresCatalog(role_url(pg_server, rls_db, ALICE.name), ALICE)
    try:
        with psycopg.connect(role_url(pg_server, rls_db, ALICE.name)) as conn:
            row = conn.execute("INSERT INTO checkpoints (job_id, uid, \"user\", engine, status, created, note) "
                               "VALUES ('m', 0, 'x', 'criu', 'writing', 0, 'hi') RETURNING uid, note").fetchone()
        assert row == (ALICE.uid, "hi")
        assert [r.job_id for r in a.list()] == ["m"]
    finally:
        a.close()
