"""IMAGE|CKPTID arguments: a path as given, or a checkpoint id looked up in the catalog.

The lookup is passed in as a function so that this logic is tested without
a catalog; :func:`catalog_lookup` is the real one the CLI uses.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcckpt.catalog import Catalog, CkptRecord
from hpcckpt.context import User
from hpcckpt.errors import CatalogError, NotFoundError, PermissionDeniedError, UsageError
from hpcckpt.image.errors import CorruptImageError, UnreadableImageError
from hpcckpt.inputs import CKPTID_MAX, CKPTID_MIN, looks_like_ckptid, parse_ckptid
from hpcckpt.store.site import Site


@dataclass(frozen=True)
class CkptRef:
    """What resolution needs from a catalog record."""

    ckptid: int
    uid: int
    path: str
    status: str
    job_id: str | None = None  # None: not known (then not compared with the image's header)
    parent: int | None = None
    error: str = ""


Lookup = Callable[[int], "CkptRef | None"]


def resolve_image(arg: str, user: User, lookup: Lookup | None) -> Path:
    """The image file ``arg`` names. Existing paths win over checkpoint ids."""
    if not arg:
        raise UsageError("an empty argument is neither an image path nor a checkpoint id")
    exists = _path_exists(arg)
    if exists or not looks_like_ckptid(arg):
        if not exists:
            raise UnreadableImageError(f"{arg}: no such image file", hint="give an image path or a checkpoint id")
        return Path(arg)
    ckptid = parse_ckptid(arg)  # a usage error naming the range, before any catalog is opened
    if lookup is None:
        raise CatalogError(f"{arg}: no such file, and no catalog to look up checkpoint {arg} in")
    return image_by_id(ckptid, user, lookup)


def _path_exists(arg: str) -> bool:
    """Whether ``arg`` names something; a path the caller may not search is a permission error.

    os.path.lexists() says False for those, and the user then heard "no such
    image file" about a file that exists.
    """
    try:
        os.lstat(arg)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDeniedError(f"{arg}: permission denied: you may not reach this image",
                                        hint="images are readable only by the user who took them (and root)"
                                        ) from exc
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return False
        raise UnreadableImageError(f"{arg}: {exc.strerror}") from exc
    except ValueError:  # an embedded NUL byte: no file has that name
        return False
    return True


def image_by_id(ckptid: int, user: User, lookup: Lookup) -> Path:
    """The image file of checkpoint ``ckptid``, owned by ``user`` (root: anyone's)."""
    ref = lookup(ckptid)
    if ref is None:
        raise NotFoundError(f"checkpoint {ckptid} is not in the catalog", hint="see 'hpcckpt list'")
    if not user.is_root and ref.uid != user.uid:
        raise PermissionDeniedError(f"checkpoint {ckptid} belongs to uid {ref.uid}, not to you ({user.uid})")
    if ref.status == "deleted":
        raise NotFoundError(f"checkpoint {ckptid} was deleted")
    if not ref.path:
        raise NotFoundError(f"checkpoint {ckptid} has no image yet (status {ref.status})")
    path = Path(ref.path)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnreadableImageError(f"{path} (checkpoint {ckptid}): {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        # the store never makes links; one there was planted, and root must not follow it
        raise UnreadableImageError(f"{path} (checkpoint {ckptid}) is a symlink; refusing to follow it")
    return path


def ref_of(rec: CkptRecord) -> CkptRef:
    """The :class:`CkptRef` of a catalog record."""
    status = getattr(rec.status, "value", rec.status)
    return CkptRef(ckptid=rec.ckptid, uid=rec.uid, path=rec.path or "", status=str(status), job_id=rec.job_id,
                   parent=rec.parent, error=rec.error or "")


class CatalogLookup:
    """A lookup through the real catalog, opened on first use (plain paths never open it).

    It also marks images corrupt (``hpcckpt verify``), through the same connection.
    The site is built on first use too: a plain image path needs no policy.
    """

    def __init__(self, user: User, site: Callable[[], Site]) -> None:
        self.user = user
        self._site = site
        self._cat: Catalog | None = None

    def catalog(self) -> Catalog:
        if self._cat is None:
            self._cat = self._site().open_catalog(self.user)
        return self._cat

    def __call__(self, ckptid: int) -> CkptRef | None:
        if not CKPTID_MIN <= ckptid <= CKPTID_MAX:
            return None  # no row has it, and the database would refuse the number (a parent id from a header)
        rec = self.catalog().get(ckptid)
        return None if rec is None else ref_of(rec)

    def mark_corrupt(self, ckptid: int, reason: str) -> bool:
        """Mark checkpoint ``ckptid`` corrupt; whether it was committed until now."""
        return bool(self.catalog().mark_corrupt(ckptid, reason))


def catalog_lookup(user: User, store: str | None, catalog: str | None, policy_file: str | None = None) -> Lookup:
    """A lookup through the catalog of the site that ``--store``, ``--catalog`` and ``--policy`` name."""
    return CatalogLookup(user, lambda: Site.load(store=store, catalog=catalog, policy_file=policy_file))


def parent_resolver(user: User, lookup: Lookup | None) -> Callable[[int], Path]:
    """ckptid -> image path for an incremental image's parents, through the catalog."""

    def resolve(ckptid: int) -> Path:
        if lookup is None:
            raise CatalogError(f"checkpoint {ckptid} is a parent image, and there is no catalog to find it in")
        ref = lookup(ckptid)
        if ref is not None and ref.status == "corrupt":
            # Found damaged before: every image that takes chunks from it is unrestorable too.
            why = ref.error or "no reason recorded"
            raise CorruptImageError(f"parent checkpoint {ckptid} is marked corrupt: {why}", path=ref.path or None,
                                    hint="resume from an image of another chain (hpcckpt list JOBID shows each "
                                    "image's parent)")
        return image_by_id(ckptid, user, lookup)

    return resolve
