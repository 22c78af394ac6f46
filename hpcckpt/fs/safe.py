"""Filesystem helpers that are safe to run as root in directories users control.

hpcckpt runs as root in Slurm's prolog and epilog and in ``gc`` across all
users, inside a store whose per-user directories the users own. A user can
plant a symlink there (``ROOT/alice/4242 -> /etc``) hoping root writes through
it. So, below a trusted base directory (the store root, set by the admin),
every component is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its
parent's descriptor, its owner is checked, and files are created with
``O_EXCL | O_NOFOLLOW`` through that descriptor: nothing is resolved by name
twice, so nothing can be swapped in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from hpcckpt.errors import StoreError, UnsafePathError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
TEMP_PREFIX = ".tmp-"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What to do about a store directory hpcckpt cannot use, in every message about one.
STORE_HINT = ("pass --store DIR, or set $HPCCKPT_STORE or the policy's storage.root, to a directory you can "
              "write (on a cluster: the parallel filesystem); 'hpcckpt doctor' checks it")


def running_as_root() -> bool:
    return os.geteuid() == 0


def fsync_dir(path: Path | str) -> None:
    """Make a rename or unlink in ``path`` durable (POSIX needs the directory synced too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_owned_dir(st: os.stat_result, where: Path, uid: int) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{where}: not a directory", hint="remove it or choose another store root")
    # Root-owned is acceptable for root's own tree; anything else must be the user's.
    if st.st_uid != uid and not (uid == 0 and st.st_uid == 0):
        raise UnsafePathError(
            f"{where}: owned by uid {st.st_uid}, expected uid {uid}",
            hint="someone else created this directory; an admin should inspect and remove it",
        )


def open_private_dir(
    path: Path,
    uid: int,
    gid: int,
    *,
    base: Path | None = None,
    create: bool = True,
) -> int:
    """Open (creating 0700 if asked) ``path`` and return an ``O_DIRECTORY`` descriptor.

    ``base`` is trusted and opened normally (an admin may have symlinked the
    store root); every component of ``path`` below it is opened without
    following symlinks and must be owned by ``uid``. When running as root,
    created directories are given to ``uid:gid``. The caller closes the fd.
    """
    path = Path(path)
    base = Path(base) if base is not None else path.parent
    try:
        rel = path.relative_to(base)
    except ValueError as exc:
        raise StoreError(f"{path} is not inside {base}") from exc
    if any(part in ("..", "") for part in rel.parts):
        raise UnsafePathError(f"{path}: '..' is not allowed below {base}")
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
        # The base is admin-configured; create it readable so per-user dirs below are reachable.
        try:
            os.makedirs(base, mode=0o755, exist_ok=True)
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"{base}: cannot create the store directory: {exc.strerror}",
                             hint=STORE_HINT) from exc
    except OSError as exc:
        raise StoreError(f"{base}: cannot open the store directory: {exc.strerror}", hint=STORE_HINT) from exc
    where = base
    try:
        for part in rel.parts:
            where = where / part
            created = False
            if create:
                try:
                    os.mkdir(part, PRIVATE_DIR_MODE, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass
                except PermissionError as exc:
                    # An ordinary user under a root-owned root that nobody prepared.
                    raise StoreError(
                        f"{where}: cannot create this directory: {exc.strerror}",
                        hint=f"ask an admin to create {where} owned by you, or to make {where.parent} "
                        "world-writable with the sticky bit (chmod 1777), as for /tmp; "
                        "under Slurm the hpcckpt prolog creates it",
                    ) from exc
                except OSError as exc:  # a full disk, a read-only filesystem, /proc
                    raise StoreError(f"{where}: cannot create this directory: {exc.strerror}",
                                     hint=STORE_HINT) from exc
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(
                        f"{where}: is a symlink or not a directory; refusing to follow it",
                        hint="remove it; hpcckpt creates its own directories",
                    ) from exc
                if exc.errno == errno.ENOENT:
                    raise
                raise StoreError(f"{where}: cannot open: {exc.strerror}", hint=STORE_HINT) from exc
            os.close(fd)
            fd = child
            st = os.fstat(fd)
            if created and running_as_root() and (st.st_uid, st.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)
                st = os.fstat(fd)
            _check_owned_dir(st, where, uid)
            if stat.S_IMODE(st.st_mode) != PRIVATE_DIR_MODE:
                # The umask may have widened nothing, but an old or hand-made dir may be 0755.
                os.fchmod(fd, PRIVATE_DIR_MODE)
        return fd
    except BaseException:
        os.close(fd)
        raise


def ensure_private_dir(path: Path, uid: int, gid: int, *, base: Path | None = None) -> Path:
    """Create ``path`` (and missing parents below ``base``) as 0700 dirs owned by ``uid:gid``."""
    fd = open_private_dir(path, uid, gid, base=base, create=True)
    os.close(fd)
    return Path(path)


def open_private_file_at(
    dir_fd: int,
    name: str,
    uid: int,
    gid: int,
    *,
    flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL,
) -> int:
    """Create ``name`` in the directory ``dir_fd`` as a new 0600 file owned by ``uid:gid``.

    ``O_EXCL | O_NOFOLLOW`` means a planted file or symlink of that name makes
    this fail instead of being written through.
    """
    if "/" in name or name in (".", ".."):
        raise UnsafePathError(f"{name!r} is not a single file name")
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if running_as_root() and (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(st.st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        return fd
    except BaseException:
        os.close(fd)
        raise


def temp_name(final_name: str) -> str:
    """A temp name beside ``final_name`` that gc recognises and no other writer picks."""
    return f"{TEMP_PREFIX}{final_name}.{os.getpid()}.{secrets.token_hex(4)}"


def atomic_write_bytes(
    path: Path,
    data: bytes,
    *,
    uid: int | None = None,
    gid: int | None = None,
    mode: int = PRIVATE_FILE_MODE,
) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory.

    A crash leaves either the old content or the new, never a mix. ``mode``:
    0600 unless the file is meant to be read by others (a metrics textfile).
    """
    path = Path(path)
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = temp_name(path.name)
        fd = open_private_file_at(dir_fd, tmp, uid, gid)
        try:
            if mode != PRIVATE_FILE_MODE:
                os.fchmod(fd, mode)
            with os.fdopen(fd, "wb", closefd=True) as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# Slurm ids ("4242", "4242_7", "4242+1", "4242.batch") and plain local ids pass unchanged.
_PLAIN_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._+-]")


def safe_job_component(job_id: str) -> str:
    """Map any job id to one safe path component.

    Ordinary ids map to themselves, so ``ROOT/USER/4242`` is what an admin
    expects. Anything else (``..``, ``/``, newlines, very long ids) becomes a
    sanitised prefix plus ``~`` and a hash of the full id: ``~`` never occurs in
    a plain component, so two different ids can never share a directory.
    """
    if not isinstance(job_id, str) or job_id == "":
        raise StoreError("empty job id", hint="pass the Slurm job id or a local id")
    if _PLAIN_COMPONENT.fullmatch(job_id):
        return job_id
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    prefix = _UNSAFE_CHARS.sub("_", job_id).lstrip("._")[:48]
    return f"{prefix}~{digest}"


def is_safe_component(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and "\x00" not in name


def iter_dir_nofollow(dir_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    """Entries of an open directory with their lstat, never following symlinks."""
    for name in os.listdir(dir_fd):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we looked: a concurrent gc or publish
        yield name, st


# setfsuid(2) changes only the calling thread's filesystem identity, unlike
# seteuid which glibc broadcasts to every thread, so root can open a user's
# SQLite catalog with the user's permissions without disturbing other threads.
_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


@contextlib.contextmanager
def as_fs_user(uid: int, gid: int) -> Iterator[None]:
    """Within the block, this thread touches files with ``uid:gid``'s permissions.

    Only when running as root on behalf of another user; otherwise a no-op.
    SQLite opens its journal and database by name and follows symlinks, so
    this is what keeps root from writing through a link a user planted in
    their own directory.
    """
    if not running_as_root() or uid == 0:
        yield
        return
    libc = _get_libc()
    old_gid = libc.setfsgid(gid)
    old_uid = libc.setfsuid(uid)
    # setfsuid reports failure only by not changing; ask again to be sure.
    if libc.setfsuid(uid) != uid or libc.setfsgid(gid) != gid:
        libc.setfsuid(old_uid)
        libc.setfsgid(old_gid)
        raise StoreError(f"cannot switch filesystem identity to uid {uid}")
    try:
        yield
    finally:
        libc.setfsuid(old_uid)
        libc.setfsgid(old_gid)
