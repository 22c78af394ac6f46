"""Fixtures for catalog and store tests: a real PostgreSQL server, and both backends."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpcckpt.catalog import Catalog, open_catalog
from hpcckpt.context import User, current_user
from tests.pgserver import PgServer, PgUnavailable

_db_counter = itertools.count(1)


def _session_server(config: pytest.Config) -> PgServer:
    """One server per test session, started on first use and stopped by pid at the end.

    Kept on the config (not in a fixture of its own) so that ``pg_url`` works
    when imported alone into another directory's conftest.
    """
    server: PgServer | None = getattr(config, "_hpcckpt_pg", None)
    if server is None:
        try:
            server = PgServer().start()
        except PgUnavailable as exc:
            pytest.skip(f"PostgreSQL unavailable: {exc}")
        config._hpcckpt_pg = server  # type: ignore[attr-defined]
        config.add_cleanup(server.stop)
    return server


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> PgServer:
    return _session_server(request.config)


@pytest.fixture(scope="session")
def pg_url(request: pytest.FixtureRequest) -> str:
    """A database on the session's PostgreSQL server, shared by the whole session."""
    return _session_server(request.config).create_database("hpcckpt_session")


@pytest.fixture
def fresh_pg_url(pg_server: PgServer) -> str:
    """An empty database of its own for one test."""
    return pg_server.create_database(f"hpcckpt_t{next(_db_counter)}")


@pytest.fixture
def me() -> User:
    return current_user()


@pytest.fixture
def store_root() -> Iterator[Path]:
    """A store root other users can traverse (pytest's tmp_path is root-only 0700)."""
    base = Path(tempfile.mkdtemp(prefix="hpcckpt-store-"))
    base.chmod(0o755)
    root = base / "store"
    root.mkdir(mode=0o755)
    yield root
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, store_root: Path) -> str | None:
    """None for the per-user SQLite default, else a fresh PostgreSQL database URL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("fresh_pg_url")
    return url


@pytest.fixture
def make_catalog(catalog_url: str | None, store_root: Path) -> Iterator[Callable[[User], Catalog]]:
    opened: list[Catalog] = []

    def make(user: User) -> Catalog:
        cat = open_catalog(catalog_url, store_root, user)
        opened.append(cat)
        return cat

    yield make
    for cat in opened:
        cat.close()


@pytest.fixture
def cat(make_catalog: Callable[[User], Catalog], me: User) -> Catalog:
    return make_catalog(me)
