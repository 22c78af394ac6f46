"""What a job's process tree looks like and which regular files it has open.

The checkpoint pipeline dumps with the job left running (the freeze is only
CRIU's own), so this is read in two halves:

* just *before* the dump, from /proc, while the job runs (:func:`snapshot`):
  the task tree, and for every open regular file its path, open flags,
  inode and mtime. None of these change when the job merely writes.
* the sizes from CRIU's own images *after* the dump (:func:`files_at_dump`
  with :func:`hpcckpt.criu.images.dumped_files`): the size each file had at the
  freeze, which is what CRIU checks at restore and what hpcckpt cuts a grown
  output file back to.

Paths and access modes are only ever taken from the kernel (/proc), never
from the images, which sit in a directory the job's owner can write: an
image edited between the dump and this read can make hpcckpt record a
wrong size for a file the job really had open, but never name another file.

Everything is read through ``/proc/PID/...`` of the job's own tasks; nothing
here opens the job's files themselves, so a path the job planted cannot make
a root runner follow a symlink.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcckpt.criu.images import DumpedFile
from hpcckpt.image import OpenFile, TaskInfo

PROC = Path("/proc")
_O_ACCMODE = 0o3
_O_APPEND = 0o2000


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads' children)."""
    out: list[int] = []
    try:
        tids = os.listdir(PROC / str(pid) / "task")
    except OSError:
        return out
    for tid in tids:
        try:
            out.extend(int(x) for x in _read(PROC / str(pid) / "task" / tid / "children").split())
        except OSError:
            continue
    return out


def tree_pids(root: int) -> list[int]:
    """``root`` and every descendant, parents before children."""
    order, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        order.append(pid)
        todo.extend(children(pid))
    return order


def _stat_fields(pid: int) -> tuple[str, int, int, int]:
    raw = _read(PROC / str(pid) / "stat")
    # comm may hold spaces and parentheses: it ends at the last ')'.
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    return comm, int(rest[1]), int(rest[2]), int(rest[3])  # ppid, pgrp, session


def task_info(pid: int) -> TaskInfo:
    comm, ppid, pgid, sid = _stat_fields(pid)
    cmdline = [a for a in _read(PROC / str(pid) / "cmdline").split("\x00") if a]
    st = os.stat(PROC / str(pid))
    return TaskInfo(pid=pid, ppid=ppid, pgid=pgid, sid=sid, comm=comm, cmdline=cmdline, uid=st.st_uid, gid=st.st_gid)


def tasks(root: int) -> list[TaskInfo]:
    out = []
    for pid in tree_pids(root):
        try:
            out.append(task_info(pid))
        except (OSError, ValueError):
            continue  # exited in between; CRIU's own view is authoritative
    return out


def _mode(flags: int) -> str:
    acc = flags & _O_ACCMODE
    if acc == os.O_RDONLY:
        return "r"
    if flags & _O_APPEND:
        return "a"
    return "w" if acc == os.O_WRONLY else "rw"


def _fd_flags(pid: int, fd: str) -> int:
    for line in _read(PROC / str(pid) / "fdinfo" / fd).splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    return 0


@dataclass(frozen=True)
class FdState:
    """One open regular file of a task, as /proc shows it."""

    path: str
    flags: int  # open(2) flags, from /proc/PID/fdinfo
    size: int
    mtime_ns: int
    inode: int
    dev: int


def fd_state(pid: int, fd: int) -> FdState | None:
    """The regular file open as ``fd`` in ``pid``; None if it is not one (or no longer open)."""
    link = PROC / str(pid) / "fd" / str(fd)
    try:
        target = os.readlink(link)
        st = os.stat(link)  # the magic link: the open file itself, not a path lookup
        flags = _fd_flags(pid, str(fd))
    except (OSError, ValueError):
        return None
    # Deleted files (" (deleted)") have no path to check at restore; CRIU handles them itself.
    if not stat.S_ISREG(st.st_mode) or not target.startswith("/") or target.endswith(" (deleted)"):
        return None
    return FdState(target, flags, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def fd_states(pid: int) -> dict[int, FdState]:
    """Every open regular file of ``pid``, by fd."""
    try:
        fds = os.listdir(PROC / str(pid) / "fd")
    except OSError:
        return {}
    out: dict[int, FdState] = {}
    for name in fds:
        try:
            fd = int(name)
        except ValueError:
            continue
        st = fd_state(pid, fd)
        if st is not None:
            out[fd] = st
    return out


def open_files(pids: list[int]) -> list[OpenFile]:
    """Every regular file open in ``pids``, one record per (pid, fd), sizes as of now."""
    return [
        OpenFile(pid=pid, fd=fd, path=st.path, size=st.size, mtime_ns=st.mtime_ns, mode=_mode(st.flags),
                 inode=st.inode, dev=st.dev)
        for pid in pids
        for fd, st in sorted(fd_states(pid).items())
    ]


def ns_pid(pid: int) -> int | None:
    """``pid`` as seen inside its own (innermost) PID namespace: the pid CRIU's images use."""
    try:
        for line in _read(PROC / str(pid) / "status").splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class TreeSnapshot:
    """The tree and its open files, read from /proc just before a dump."""

    root: int
    tasks: list[TaskInfo] = field(default_factory=list)
    fds: dict[tuple[int, int], FdState] = field(default_factory=dict)  # (host pid, fd) -> file
    host_pids: dict[int, int] = field(default_factory=dict)  # pid in the job's namespace -> host pid

    @property
    def pids(self) -> list[int]:
        return [t.pid for t in self.tasks]

    def open_files(self) -> list[OpenFile]:
        """The open files with their sizes as of the snapshot (for dumps that are not CRIU images)."""
        return [
            OpenFile(pid=pid, fd=fd, path=st.path, size=st.size, mtime_ns=st.mtime_ns, mode=_mode(st.flags),
                     inode=st.inode, dev=st.dev)
            for (pid, fd), st in sorted(self.fds.items())
        ]


def snapshot(root: int) -> TreeSnapshot:
    """Tasks, namespace pids and open regular files of the tree at ``root``, read while it runs."""
    snap = TreeSnapshot(root, tasks(root))
    for t in snap.tasks:
        vpid = ns_pid(t.pid)
        if vpid is not None:
            snap.host_pids[vpid] = t.pid
        for fd, st in fd_states(t.pid).items():
            snap.fds[(t.pid, fd)] = st
    return snap


def find_host_pid(root: int, vpid: int) -> int | None:
    """The host pid of namespace pid ``vpid`` in the tree at ``root`` now (a task forked since the snapshot)."""
    for pid in tree_pids(root):
        if ns_pid(pid) == vpid:
            return pid
    return None


def files_at_dump(
    snap: TreeSnapshot,
    dumped: Sequence[DumpedFile],
    *,
    late_fd: Callable[[int, int], FdState | None] = fd_state,
    late_pid: Callable[[int, int], int | None] = find_host_pid,
) -> list[OpenFile]:
    """One :class:`OpenFile` per regular file CRIU dumped, with the size it had at the freeze.

    Path, access mode, inode and mtime come from the snapshot (the kernel's
    word); a file opened between the snapshot and the freeze is looked up in
    /proc again through ``late_fd`` and kept only if the path is the one CRIU
    recorded. The size is CRIU's; where CRIU records none (files open
    O_WRONLY|O_APPEND, which it does not check at restore) it is the larger of
    the descriptor's offset at the freeze (an appending descriptor's offset
    is the end of its last write) and the size before the dump; both are at
    most the size at the freeze, so cutting the file back to it never loses
    what the job wrote before it.
    """
    out: list[OpenFile] = []
    for d in dumped:
        if d.remapped:
            continue  # deleted or unlinked: CRIU restores its own copy, no path to check
        host = snap.host_pids.get(d.pid)
        if host is None:
            host = late_pid(snap.root, d.pid)
            if host is None:
                continue
        st = snap.fds.get((host, d.fd))
        before = st is not None and st.path == d.path
        if not before:
            st = late_fd(host, d.fd)
        if st is None or st.path != d.path:
            continue  # the kernel cannot vouch for this path any more: record nothing about it
        size = d.size
        if size is None:
            size = max(d.pos, st.size) if before else d.pos
        out.append(OpenFile(pid=host, fd=d.fd, path=d.path, size=size, mtime_ns=st.mtime_ns,
                            mode=_mode(st.flags), inode=st.inode, dev=st.dev))
    return out
