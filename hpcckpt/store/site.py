"""The one ``Site``: the policy, the store, the staging, the catalog and the engine, built in one place.

Every command, the runner, the Slurm hooks and the application API used to
put these together themselves, each reading flags, environment and policy
in its own order. Now each builds a ``Site`` once and passes it down:

* ``Site.load(store=..., catalog=..., policy_file=...)`` for a user's
  command: flags first, then ``$HPCCKPT_STORE``/``$HPCCKPT_CATALOG``, then
  the effective policy (site, user, flags), then the defaults;
* ``Site.for_hooks()`` for the Slurm hooks, which act for the site: only the
  site policy counts, never a user's file, and ``$HPCCKPT_STORE`` and
  ``$HPCCKPT_STAGING`` come from the hook's env file.

A Site holds no connection. ``open_catalog(user)``, ``store(user)`` and
``opened(user)`` give one user's catalog and store; ``engine()`` the
checkpoint engine (CRIU, found as ``$HPCCKPT_CRIU`` or on PATH).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcckpt.catalog import Catalog, open_catalog
from hpcckpt.context import User, resolve_catalog_url, resolve_store_root
from hpcckpt.criu.engine import Criu
from hpcckpt.criu.interface import CheckpointEngine
from hpcckpt.fs.layout import TMPFS, StagingLayout, StoreLayout
from hpcckpt.policy import Policy, build_policy, load_policy, site_policy_path
from hpcckpt.store.images import Store
from hpcckpt.store.retention import RetentionRules


@dataclass(frozen=True)
class Site:
    """Where checkpoints live and under which rules, for one command or hook."""

    policy: Policy
    store_root: Path
    catalog_url: str | None  # None: each user's SQLite file in the store

    @classmethod
    def load(cls, *, store: str | None = None, catalog: str | None = None, policy_file: str | None = None,
             cli: Mapping[str, Any] | None = None, cli_flags: Mapping[str, str] | None = None) -> Site:
        """For a user's command: ``--store``, ``--catalog`` and ``--policy`` (None: environment, policy, default)."""
        pol = load_policy(user_file=Path(policy_file) if policy_file else None, cli=cli, cli_flags=cli_flags)
        return cls.from_policy(pol, store=store, catalog=catalog)

    @classmethod
    def from_policy(cls, pol: Policy, *, store: str | None = None, catalog: str | None = None) -> Site:
        return cls(pol, resolve_store_root(store, pol.storage.root), resolve_catalog_url(catalog, pol.storage.catalog))

    @classmethod
    def for_hooks(cls, environ: Mapping[str, str] | None = None) -> Site:
        """For the Slurm hooks (root): the site policy alone, and the hook env file's store."""
        env = os.environ if environ is None else environ
        pol = build_policy(None, site_policy_path(), {})
        return cls.from_policy(pol, store=env.get("HPCCKPT_STORE") or None)

    # -- what it names ---------------------------------------------------------

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(self.store_root)

    @property
    def retention(self) -> RetentionRules:
        return RetentionRules.from_policy(self.policy)

    @property
    def shared_catalog(self) -> bool:
        """One catalog for every user (PostgreSQL), rather than a SQLite file per user: any catalog URL names one."""
        return bool(self.catalog_url)

    def staging(self, environ: Mapping[str, str] | None = None, *, tmpfs: Path | None = TMPFS) -> StagingLayout:
        """Node-local staging: ``$HPCCKPT_STAGING`` or policy ``storage.staging`` on disk, and tmpfs."""
        env = os.environ if environ is None else environ
        disk = env.get("HPCCKPT_STAGING") or self.policy.storage.staging
        return StagingLayout(Path(disk) if disk else None, tmpfs)

    # -- what it opens -----------------------------------------------------------

    def store(self, user: User) -> Store:
        return Store(self.store_root, user)

    def open_catalog(self, user: User) -> Catalog:
        """``user``'s catalog (created or migrated as needed); the caller closes it."""
        return open_catalog(self.catalog_url, self.store_root, user)

    @contextmanager
    def opened(self, user: User) -> Iterator[tuple[Catalog, Store]]:
        """The catalog and store ``user`` acts through, the catalog closed afterwards."""
        cat = self.open_catalog(user)
        try:
            yield cat, self.store(user)
        finally:
            cat.close()

    def engine(self) -> CheckpointEngine:
        return Criu.locate()
