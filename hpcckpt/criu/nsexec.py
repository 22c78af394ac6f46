"""Enter fresh namespaces, bring their loopback up, then exec a command: ``nsexec.py [OPTIONS] -- ARGV``.

Why this exists: a job with a network namespace of its own is restored by
a ``criu restore`` that runs inside a *fresh* network namespace, so that the
job's loopback sockets (an MPI singleton's daemon, ``mpirun`` and its ranks,
a local server) come back on addresses no other process on the node holds.
A new network namespace has its loopback down, and CRIU cannot re-bind a
socket to 127.0.0.1 there. ``unshare(1)`` cannot bring a link up and no
shell is wanted between us and CRIU, so this small program does the three
steps and execs CRIU in place (CRIU stays the runner's child, and with
``--restore-sibling`` so does the restored job).

Options:
  --userns UID:GID   also a user and mount namespace, uid/gid 0 inside = UID/GID outside
  --net              a network namespace, loopback up
  --sync R:W         write one byte to fd W once the namespaces exist, then wait for one byte on fd R
                     before the exec (the runner attaches the job's outside link meanwhile)

It imports nothing but the standard library, so that it starts fast when
run by path (``python -I -S nsexec.py``); :mod:`hpcckpt.core.launch.spawn`
imports :func:`loopback_up` from it for a job's first start.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sh")


def loopback_up() -> None:
    """Bring ``lo`` of our network namespace up (which gives it 127.0.0.1 and ::1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
        flags = _IFREQ.unpack(raw)[1]
        if not flags & _IFF_UP:
            fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def write_id_maps(uid: int, gid: int) -> None:
    """Become root of a just-created user namespace, as ``uid``/``gid`` outside (and nothing else)."""
    # The kernel accepts an unprivileged gid_map only once setgroups(2) is denied in the namespace,
    # so that nobody can drop a group that was denying them access.
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1\n"), ("gid_map", f"0 {gid} 1\n")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _die(what: str, err: BaseException) -> None:
    sys.stderr.write(f"hpcckpt nsexec: {what}: {err}\n")
    os._exit(126)


def main(args: list[str]) -> None:
    userns: tuple[int, int] | None = None
    net = False
    sync: tuple[int, int] | None = None
    while args and args[0] != "--":
        opt = args.pop(0)
        if opt == "--userns":
            u, g = args.pop(0).split(":")
            userns = (int(u), int(g))
        elif opt == "--net":
            net = True
        elif opt == "--sync":
            rd, wr = args.pop(0).split(":")
            sync = (int(rd), int(wr))
        else:
            _die("bad option", ValueError(opt))
    argv = args[1:]
    if not argv:
        _die("usage", ValueError("nsexec.py [--userns UID:GID] [--net] [--sync R:W] -- ARGV"))
    flags = (CLONE_NEWUSER | CLONE_NEWNS if userns else 0) | (CLONE_NEWNET if net else 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if flags and libc.unshare(flags) != 0:
        _die("unshare", OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno())))
    try:
        if userns:
            write_id_maps(*userns)
        if net:
            loopback_up()
    except OSError as exc:
        _die("setting up the namespaces", exc)
    if sync is not None:
        r, w = sync
        os.write(w, b"r")
        os.close(w)
        if os.read(r, 1) != b"g":  # the runner gave up (or died): do not start CRIU
            os._exit(125)
        os.close(r)
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        _die(f"exec {argv[0]}", exc)


if __name__ == "__main__":
    main(sys.argv[1:])
