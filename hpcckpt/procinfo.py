"""What a job's process tree looks like and which regular files it has open, from /proc.

Read while the tree is stopped (right after ``criu dump --leave-stopped``), so
the file sizes recorded here are the sizes CRIU saw: at restore CRIU refuses a
file whose size differs, and hpcckpt cuts a grown output file back to exactly
this size.

Everything is read through ``/proc/PID/...`` of the job's own tasks; nothing
here opens the job's files themselves, so a path the job planted cannot make
a root runner follow a symlink.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

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


def open_files(pids: list[int]) -> list[OpenFile]:
    """Every regular file open in ``pids``, one record per (pid, fd)."""
    out: list[OpenFile] = []
    for pid in pids:
        fd_dir = PROC / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in sorted(fds, key=int):
            try:
                target = os.readlink(fd_dir / fd)
                st = os.stat(fd_dir / fd)  # the magic link: the open file itself, not a path lookup
                flags = _fd_flags(pid, fd)
            except (OSError, ValueError):
                continue
            # Deleted files (" (deleted)") have no path to check at restore; CRIU handles them itself.
            if not stat.S_ISREG(st.st_mode) or not target.startswith("/") or target.endswith(" (deleted)"):
                continue
            out.append(OpenFile(pid=pid, fd=int(fd), path=target, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                mode=_mode(flags), inode=st.st_ino, dev=st.st_dev))
    return out
