"""Every path hpcckpt owns, named in one place.

The shared store (a parallel filesystem)::

    ROOT/USER/catalog.sqlite          the user's SQLite catalog (the default backend)
    ROOT/USER/JOB/ckpt-N.hck          image N of JOB

Node-local staging, where a dump waits for its flush to the store::

    /dev/shm/hpcckpt-staging/USER/JOB/stage-*/   on tmpfs, when the node has the memory
    STAGING/USER/JOB/stage-*/                    policy storage.staging (node-local disk)

The job's own scratch, so that the pid-named files of jobs (all with the same
small pids in their namespaces) never collide::

    $TMPDIR/hpcckpt-UID/JOB           the job's TMPDIR
    /dev/shm/hpcckpt-UID/JOB          OpenMPI's shared-memory segments

USER is a passwd name checked to be one path component; JOB is any job id
made into one safe component (:func:`~hpcckpt.fs.safe.safe_job_component`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpcckpt.context import User
from hpcckpt.errors import UnsafePathError
from hpcckpt.fs.safe import is_safe_component, safe_job_component

CATALOG_FILE = "catalog.sqlite"
TMPFS = Path("/dev/shm")
TMPFS_SUBDIR = "hpcckpt-staging"
STAGE_PREFIX = "stage-"
DONE_MARKER = ".done"
IMAGE_SUFFIX = ".hck"


def user_component(user: User) -> str:
    """The user's directory name under a root-owned tree."""
    # '.', '' or 'a/b' would make root create directories outside that user's own.
    if not is_safe_component(user.name):
        raise UnsafePathError(f"user name {user.name!r} (uid {user.uid}) cannot name a directory",
                              hint="fix the passwd entry; hpcckpt refuses to create directories for it")
    return user.name


def image_name(ckptid: int) -> str:
    return f"ckpt-{int(ckptid)}{IMAGE_SUFFIX}"


@dataclass(frozen=True)
class StoreLayout:
    """Paths in the shared store under ``root``."""

    root: Path

    def user_dir(self, user: User) -> Path:
        return Path(self.root) / user_component(user)

    def catalog_file(self, user: User) -> Path:
        return self.user_dir(user) / CATALOG_FILE

    def job_dir(self, user: User, job_id: str) -> Path:
        return self.user_dir(user) / safe_job_component(job_id)

    def image(self, user: User, job_id: str, ckptid: int) -> Path:
        return self.job_dir(user, job_id) / image_name(ckptid)


@dataclass(frozen=True)
class StagingLayout:
    """Node-local staging: tmpfs when the dump fits in memory, else ``disk`` (policy storage.staging)."""

    disk: Path | None
    tmpfs: Path | None = TMPFS

    @property
    def tmpfs_base(self) -> Path | None:
        return None if self.tmpfs is None else Path(self.tmpfs) / TMPFS_SUBDIR

    def job_dir(self, base: Path, user: User, job_id: str) -> Path:
        return Path(base) / user_component(user) / safe_job_component(job_id)

    @property
    def bases(self) -> list[Path]:
        """Where staging may be on this node, tmpfs first."""
        return [b for b in (self.tmpfs_base, self.disk) if b is not None]

    def candidates(self, user: User, job_id: str) -> list[Path]:
        """Every place a job's staging may be, for the epilog and the metrics to look in."""
        return [self.job_dir(b, user, job_id) for b in self.bases]


def scratch_base(parent: Path, user: User) -> Path:
    """The user's part of a shared scratch directory (``$TMPDIR``, ``/dev/shm``): by uid, made 0700."""
    return Path(parent) / f"hpcckpt-{user.uid}"


def scratch_dir(parent: Path, user: User, job_id: str) -> Path:
    return scratch_base(parent, user) / safe_job_component(job_id)
