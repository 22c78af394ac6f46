"""A job's own temporary directories, so that names made from pids never collide between jobs.

Every job runs in a PID namespace of its own, so every job's processes have
the same small pids (1, 2, 3 ...). Programs that name temporary files after
their pid then collide between two jobs on one node: OpenMPI puts its session
directory in ``$TMPDIR/ompi.HOST.UID/pid.N`` (and the job that ends first
deletes the other's ``hwloc.sm``), and names its shared-memory segments
``/dev/shm/vader_segment.HOST.JOBID.RANK`` with a job id hashed from
``mpirun``'s pid, so two MPI jobs on a node would write into each other's
segments. Each job therefore gets

* ``TMPDIR`` = ``$TMPDIR/hpcckpt-UID/JOB`` (``/tmp`` when unset), and
* ``OMPI_MCA_btl_vader_backing_directory`` = ``/dev/shm/hpcckpt-UID/JOB``,

unless the user set them. Both are 0700 directories of the job's owner,
made before the job starts and made again, at the same paths (the job's
environment is restored with its memory), before it is restored. They are
removed when the job has ended for good; a job that stops to be requeued
keeps them for its restore on this node.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from hpcckpt import log as hlog
from hpcckpt.context import User
from hpcckpt.criu.images import SIDE_DIRS
from hpcckpt.errors import HpcckptError, StoreError
from hpcckpt.fs import safe as fsutil
from hpcckpt.fs.layout import scratch_dir
from hpcckpt.fs.tree import remove_tree_at

_log = hlog.get("runner.scratch")

SHM = Path("/dev/shm")
VADER = "OMPI_MCA_btl_vader_backing_directory"


def scratch_env(user: User, job_id: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to the job's environment (only those the user did not set)."""
    out = {"TMPDIR": str(scratch_dir(Path(environ.get("TMPDIR") or "/tmp"), user, job_id))}
    if VADER not in environ and SHM.is_dir():
        out[VADER] = str(scratch_dir(SHM, user, job_id))
    return out


def prepare(user: User, paths: Iterable[str]) -> None:
    """Make each of ``paths`` a 0700 directory of ``user``, refusing one that another user holds."""
    for raw in paths:
        path = Path(raw)
        # PARENT/hpcckpt-UID/JOB: PARENT (/tmp, /dev/shm) is world-writable and trusted as a base;
        # everything below must be the user's own, never a symlink someone planted.
        try:
            fsutil.ensure_private_dir(path, user.uid, user.gid, base=path.parent.parent)
        except (HpcckptError, OSError) as err:
            raise StoreError(f"cannot prepare the job's temporary directory {path}: {err}",
                             hint=f"remove {path.parent} if it is not yours (it must be a directory of "
                                  f"uid {user.uid}), or set TMPDIR to a directory of your own") from err


def remove(user: User, paths: Iterable[str]) -> None:
    """Delete the job's temporary directories once it has ended for good (never following a link)."""
    for raw in paths:
        path = Path(raw)
        try:
            fd = fsutil.open_private_dir(path.parent, user.uid, user.gid, base=path.parent.parent, create=False)
        except (HpcckptError, OSError):
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                remove_tree_at(fd, path.name)
        except OSError as err:
            hlog.event(_log, "scratch.not_removed", f"{path}: could not remove the job's temporary directory: "
                       f"{err}", 30)
        finally:
            os.close(fd)


# Inside a staged dump (and so inside the image): the contents of the job's i-th temporary directory.
IMAGE_DIR = "hpcckpt-scratch"
FIFOS = "fifos.json"  # [[i, relative path, mode], ...]: FIFOs hold no data, only their name matters
assert IMAGE_DIR in SIDE_DIRS
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def has_content(paths: Iterable[str]) -> bool:
    """Whether any of the directories holds anything (a cheap test made before each dump)."""
    for raw in paths:
        with contextlib.suppress(OSError), os.scandir(raw) as it:
            if next(it, None) is not None:
                return True
    return False


def capture(paths: Iterable[str], dest: Path, limit: int) -> tuple[int, list[str]]:
    """Copy the regular files and directories of each of ``paths`` into ``dest/IMAGE_DIR/i``.

    Called while the job is stopped, so that what it keeps there (OpenMPI's
    session files and shared-memory segments) is what its memory expects. On
    another node these directories are empty, and a restore without them
    fails. Sockets, FIFOs and symlinks are left out (CRIU recreates a
    listening socket itself once its directory exists). Returns the bytes
    copied and what was left out; stops adding files at ``limit`` bytes.
    """
    total, left_out = 0, []
    fifos: list[list[object]] = []
    for i, raw in enumerate(paths):
        src = Path(raw)
        for root, dirs, files in os.walk(src, followlinks=False):
            rel = Path(root).relative_to(src)
            out_dir = dest / IMAGE_DIR / str(i) / rel
            out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in files:
                path = Path(root) / name
                try:
                    lst = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISFIFO(lst.st_mode):  # OpenMPI's debugger_attach_fifo: recreated empty
                    fifos.append([str(i), str(rel / name), stat.S_IMODE(lst.st_mode)])
                    continue
                try:
                    fd = os.open(path, _READ)
                except OSError:  # a symlink (ELOOP), a socket (ENXIO), gone
                    left_out.append(str(path))
                    continue
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode) or total + st.st_size > limit:
                        left_out.append(str(path))
                        continue
                    target = out_dir / name
                    with open(target, "wb") as out:
                        os.chmod(target, st.st_mode & 0o777)
                        total += os.sendfile(out.fileno(), f.fileno(), 0, st.st_size) if st.st_size else 0
                    # The restore compares a file the job only reads with its recorded mtime.
                    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
    if fifos:
        (dest / IMAGE_DIR / FIFOS).write_text(json.dumps(fifos))
    return total, left_out


def populate(unpacked: Path, user: User, paths: Iterable[str]) -> list[str]:
    """Before a restore: put back the files of the job's temporary directories that are missing here.

    On another node they all are; on the node the job ran on they are still
    there, and what is there is left alone (nothing is overwritten). Returns
    the paths created.
    """
    created: list[str] = []
    paths = list(paths)
    prepare(user, paths)
    created += _make_fifos(unpacked / IMAGE_DIR / FIFOS, paths)
    for i, raw in enumerate(paths):
        src = unpacked / IMAGE_DIR / str(i)
        if not src.is_dir():
            continue
        for root, _dirs, files in os.walk(src, followlinks=False):
            rel = Path(root).relative_to(src)
            target_dir = Path(raw) / rel
            target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in files:
                target = target_dir / name
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 os.stat(Path(root) / name).st_mode & 0o777)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "wb") as out, open(Path(root) / name, "rb") as f:
                    st = os.fstat(f.fileno())
                    if st.st_size:
                        os.sendfile(out.fileno(), f.fileno(), 0, st.st_size)
                    os.utime(out.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
                created.append(str(target))
    return created


def _make_fifos(manifest: Path, paths: list[str]) -> list[str]:
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return []
    made: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        if not (isinstance(entry, list) and len(entry) == 3 and str(entry[0]).isdigit()
                and int(entry[0]) < len(paths) and isinstance(entry[1], str) and isinstance(entry[2], int)):
            continue
        rel = Path(entry[1])
        if rel.is_absolute() or ".." in rel.parts:
            continue
        target = Path(paths[int(entry[0])]) / rel
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkfifo(target, entry[2] & 0o777)
            made.append(str(target))
    return made
