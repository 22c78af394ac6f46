"""Who may touch a checkpoint, and with whose credentials a restore runs.

Three rules, enforced here so that every path (CLI, Slurm hooks, gc) shares
one implementation (the threat model is in docs/security.md):

1. Only the owner of a checkpoint may use it. Root may, but only when it asks
   explicitly (``allow_root=True``), so a hook cannot act on another user's
   image by accident.
2. Credentials come from the caller, never from the image. A restore started
   by root runs as the *owner of the image file* (the store gives each image
   to its user), with that user's groups and nothing of root's.
3. Before a restore, every uid and gid recorded inside the CRIU images must be
   the owner's (``hpcckpt.criu.images.check_credentials``), so a crafted image
   claiming uid 0 is refused with a clear message instead of relying on CRIU
   failing to setuid.

The ownership of a file is read with ``lstat`` (never through a symlink), and
the image file must be a regular file with a single link: a hard link to
someone else's file would otherwise lend its owner.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from hpcckpt import log as hlog
from hpcckpt.context import User, user_by_uid
from hpcckpt.criu.images import check_credentials
from hpcckpt.errors import NotFoundError, PermissionDeniedError
from hpcckpt.image.errors import UnreadableImageError, UnsafeImageError

_log = hlog.get("security")

# Environment a privilege-dropped child may inherit from its (root) parent.
# Everything else (LD_*, PYTHON*, HPCCKPT_* set for root, proxies) is dropped:
# a root hook's environment is the admin's, not the job owner's.
_SAFE_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@runtime_checkable
class HasUid(Protocol):
    """Anything that records an owner uid: a CkptRecord, an ImageMeta."""

    uid: int


Subject = HasUid | Path | str | int


def _lstat(path: Path) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such checkpoint image") from None
    except OSError as err:
        raise UnreadableImageError(f"{path}: cannot stat: {err.strerror}") from None


def user_for_uid(uid: int, gid: int | None = None) -> User:
    """The account of ``uid``; a uid with no passwd entry still gets a User (name = the number)."""
    try:
        return user_by_uid(uid)
    except KeyError:
        return User(str(uid), uid, uid if gid is None else gid, "/")


def file_owner(path: Path) -> User:
    """The owner of ``path`` itself (a symlink is reported as refused, never followed)."""
    path = Path(path)
    st = _lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeImageError(
            f"{path}: is a symlink; hpcckpt reads the owner of the image itself",
            hint="pass the image file's real path",
        )
    return user_for_uid(st.st_uid, st.st_gid)


def restore_credentials_for(image_path: Path) -> User:
    """The user a restore of ``image_path`` must run as: the owner of the file.

    The file must be a regular file with one link. A hard link is refused
    because anyone can hard-link another user's file into their own dir
    (where ``fs.protected_hardlinks`` is off) and so borrow its owner.
    """
    image_path = Path(image_path)
    st = _lstat(image_path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeImageError(f"{image_path}: is a symlink; refusing to restore through it")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeImageError(f"{image_path}: is not a regular file")
    if st.st_nlink != 1:
        raise UnsafeImageError(
            f"{image_path}: has {st.st_nlink} hard links; its owner cannot be trusted",
            hint="copy the image (cp) instead of hard-linking it",
        )
    return user_for_uid(st.st_uid, st.st_gid)


def _subject_uid(subject: Subject) -> tuple[int, str]:
    """The owner uid of ``subject`` and words naming it for messages."""
    if isinstance(subject, bool):
        raise TypeError("a bool is not an owner")
    if isinstance(subject, int):
        return subject, f"uid {subject}"
    if isinstance(subject, (str, Path)):
        owner = file_owner(Path(subject))
        return owner.uid, str(subject)
    uid = subject.uid
    ckptid = getattr(subject, "ckptid", None)
    return int(uid), (f"checkpoint {ckptid}" if ckptid is not None else "the image")


def require_owner(subject: Subject, user: User, *, allow_root: bool = False, what: str = "") -> None:
    """Refuse unless ``user`` owns ``subject`` (or is root and ``allow_root``).

    ``subject`` is a catalog record or image header (its ``uid``), a path
    (the file's owner, by lstat) or a uid.
    """
    uid, name = _subject_uid(subject)
    if uid == user.uid:
        return
    if user.is_root and allow_root:
        hlog.event(_log, "security.root_override", f"root acts on {name} owned by uid {uid}", owner_uid=uid)
        return
    owner = user_for_uid(uid)
    hint = (
        "root must ask for another user's checkpoint explicitly (the command's override option)"
        if user.is_root
        else "only the job's owner can use its checkpoints"
    )
    raise PermissionDeniedError(
        f"{what or name} belongs to {owner.name} (uid {uid}), not to {user.name} (uid {user.uid})", hint=hint
    )


def supplementary_groups(user: User) -> list[int]:
    """``user``'s groups from the group database, primary gid first."""
    try:
        groups = os.getgrouplist(user.name, user.gid)
    except (KeyError, OSError):  # a uid with no passwd entry: primary group only
        groups = [user.gid]
    return sorted(set(groups), key=lambda g: (g != user.gid, g))


def drop_privileges_to(user: User) -> None:
    """Irreversibly become ``user`` in this process: groups, gid, then uid, then verify.

    For a forked child before it execs criu (or as a ``preexec_fn`` in a
    single-threaded parent). Order matters: groups and gid can only be set
    while still root. Verification catches a kernel or seccomp that silently
    ignores a set*id call. No ``PR_SET_NO_NEW_PRIVS``: criu needs its file
    capabilities (cap_checkpoint_restore, cap_sys_ptrace) to restore the
    user's own processes.
    """
    if user.uid == 0:
        raise PermissionDeniedError("refusing to 'drop' privileges to root")
    if os.geteuid() != 0:
        if os.getuid() == os.geteuid() == user.uid:
            return
        raise PermissionDeniedError(f"cannot switch to {user.name} (uid {user.uid}) without root")
    os.setgroups(supplementary_groups(user))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise PermissionDeniedError(f"switching to uid {user.uid} did not take effect")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PermissionDeniedError("could regain root after dropping privileges; refusing to continue")


def become(user: User) -> None:
    """Root turns this whole process into ``user`` for good, before it opens anything of theirs.

    Used by ``hpcckpt resume --as-owner USER``: from here on the process can
    do exactly what USER can, so the restore runs with USER's credentials and
    the kernel, not only our checks, keeps root's power out of it. The
    environment becomes USER's too (:func:`child_environment`, keeping the
    job's HPCCKPT_* and SLURM_* context), so control sockets and any child
    see USER's home, never root's runtime dir or credentials caches.
    """
    if os.geteuid() != 0:
        raise PermissionDeniedError("only root can act as another user", hint="run it as yourself")
    drop_privileges_to(user)
    # Nothing of root's environment goes on but the locale and the job's own context.
    keep = {k: v for k, v in os.environ.items() if k.startswith(("HPCCKPT_", "SLURM_"))}
    env = child_environment(user, keep)
    os.environ.clear()
    os.environ.update(env)
    hlog.event(_log, "security.became", f"running as {user.name} (uid {user.uid}) from here on",
               uid=user.uid)


def child_environment(user: User, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process run as ``user`` on root's behalf.

    Only locale variables pass from root's environment; HOME, USER, LOGNAME
    and PATH are the target user's. ``extra`` is added last (the caller's
    deliberate choices, such as the job's own SLURM_* variables).
    """
    env = {k: os.environ[k] for k in _SAFE_ENV if k in os.environ}
    env.update(
        {
            "HOME": user.home,
            "USER": user.name,
            "LOGNAME": user.name,
            "PATH": _SAFE_PATH,
        }
    )
    if extra:
        env.update(extra)
    return env


def check_image_identity(image_path: Path, header_uid: int | None, owner: User) -> None:
    """Refuse an image whose header names a different owner from the file's.

    This is how an image copied from another user into one's own store is
    caught: the copy is owned by the new user, but its header (written by
    hpcckpt at checkpoint time) still names the user whose memory it holds.
    """
    if header_uid is None or header_uid == owner.uid:
        return
    taken_by = user_for_uid(header_uid)
    raise UnsafeImageError(
        f"{image_path}: the image was taken from {taken_by.name}'s job (uid {header_uid}) "
        f"but the file is owned by {owner.name} (uid {owner.uid}); refusing to restore it",
        hint="a checkpoint can only be restored by the user whose job it was taken from",
    )


def authorize_restore(
    image_path: Path,
    images_dir: Path,
    caller: User,
    *,
    header_uid: int | None = None,
    record_uid: int | None = None,
    allow_root: bool = False,
    namespaced: bool = False,
) -> User:
    """The single gate before ``criu restore``; returns the user to restore as.

    ``image_path`` is the hpcckpt image, ``images_dir`` its unpacked CRIU
    images, ``header_uid`` the uid in the image header and ``record_uid`` the
    catalog's. The caller must be the owner, or root with ``allow_root``; the
    file, header and catalog must agree on the owner; and every id inside
    the CRIU images must be the owner's. Raises PermissionDeniedError or
    UnsafeImageError, both before anything is restored.

    ``namespaced`` means the caller, an ordinary user, restores into a user
    namespace of its own that maps only uid/gid 0 to itself (an image of a job
    that ran unprivileged, see hpcckpt/criu/engine.py). The ids in such an
    image are namespace ids and must all be 0; the kernel then maps them to
    the caller and nobody else, so no id in the image can reach another user.
    """
    owner = restore_credentials_for(image_path)
    check_image_identity(image_path, header_uid, owner)
    if record_uid is not None and record_uid != owner.uid:
        raise UnsafeImageError(
            f"{image_path}: the catalog records uid {record_uid} but the file is owned by uid {owner.uid}",
            hint="the image was replaced or moved; run 'hpcckpt verify' and ask an admin",
        )
    require_owner(owner.uid, caller, allow_root=allow_root, what=str(image_path))
    if owner.uid == 0 and not caller.is_root:
        raise PermissionDeniedError(f"{image_path}: is owned by root")
    if namespaced:
        if caller.is_root or caller.uid != owner.uid:
            raise PermissionDeniedError(
                f"{image_path}: a namespaced image restores only as its owner, {owner.name}, never as root",
            )
        check_credentials(images_dir, 0, 0, ())
    else:
        check_credentials(images_dir, owner.uid, owner.gid, supplementary_groups(owner))
    hlog.event(
        _log,
        "security.restore_authorized",
        f"restore of {image_path} runs as {owner.name}",
        owner_uid=owner.uid,
        caller_uid=caller.uid,
    )
    return owner
