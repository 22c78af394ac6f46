"""Session-wide fixtures shared across test directories.

Fixtures that start real services (the Slurm cluster, PostgreSQL) live next to
the code that drives them and are imported here so every test dir can use them.
"""

from __future__ import annotations

import contextlib

with contextlib.suppress(ImportError):
    from tests.slurm.fixtures import slurm_cluster  # noqa: F401
with contextlib.suppress(ImportError):
    from tests.catalog.conftest import pg_url  # noqa: F401
