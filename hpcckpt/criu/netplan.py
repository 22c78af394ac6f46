"""Which TCP connections a job holds, read from /proc just before each dump.

CRIU refuses a tree with an established TCP connection unless it is told
``--tcp-established``, and with it carries every connection. Rather than
asking users to tune that in a policy, the runner looks before each dump:

* a connection whose peer is another socket of the same job (both ends in
  the frozen tree: an MPI singleton and its ``orted``, ``mpirun`` and its
  ranks, a local server and its client) is carried;
* a connection to a peer outside the job cannot be: the peer will not be
  there after a restore. Policy ``job.external_connections`` decides:
  ``close`` checkpoints anyway and the restored job finds the connection
  closed (:func:`close_connections`), ``skip`` skips this checkpoint.

Everything is read from the kernel: the job's socket inodes from
``/proc/PID/fd`` and the endpoints from ``/proc/PID/net/tcp{,6}``, which show
the table of the job's own network namespace.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

# /proc/net/tcp states (include/net/tcp_states.h): LISTEN and CLOSE carry no connection.
_LISTEN, _CLOSE = 0x0A, 0x07


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Connection:
    inode: int
    local: Endpoint
    peer: Endpoint


@dataclass
class NetPlan:
    """What the job holds: connections inside it, and connections leaving it."""

    internal: list[Connection] = field(default_factory=list)
    external: list[Connection] = field(default_factory=list)

    @property
    def needs_tcp_established(self) -> bool:
        return bool(self.internal or self.external)

    def describe_external(self, limit: int = 5) -> str:
        shown = ", ".join(f"{c.local} -> {c.peer}" for c in self.external[:limit])
        more = len(self.external) - limit
        return shown + (f" and {more} more" if more > 0 else "")


def _addr(hexaddr: str) -> Endpoint:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints each 32-bit word of the address in host byte order.
    words = b"".join(struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
    text = socket.inet_ntop(family, words)
    if text.startswith("::ffff:") and "." in text:  # an IPv4 peer of a dual-stack socket
        text = text[len("::ffff:"):]
    return Endpoint(text, int(port, 16))


def parse_tcp_table(text: str) -> list[tuple[int, int, Endpoint, Endpoint]]:
    """(inode, state, local, remote) of each line of a /proc/net/tcp or tcp6 table."""
    rows: list[tuple[int, int, Endpoint, Endpoint]] = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        try:
            rows.append((int(parts[9]), int(parts[3], 16), _addr(parts[1]), _addr(parts[2])))
        except (ValueError, IndexError, OSError):
            continue
    return rows


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """Inodes of the sockets the tasks ``pids`` have open."""
    found: set[int] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
    return found


def classify(rows: Iterable[tuple[int, int, Endpoint, Endpoint]], ours: set[int]) -> NetPlan:
    """Split the job's connected sockets into those whose peer is the job's own and the rest."""
    rows = list(rows)
    mine = [r for r in rows if r[0] in ours and r[1] not in (_LISTEN, _CLOSE)]
    local_ends = {(r[2].host, r[2].port) for r in mine}
    plan = NetPlan()
    for inode, _state, local, peer in mine:
        conn = Connection(inode, local, peer)
        (plan.internal if (peer.host, peer.port) in local_ends else plan.external).append(conn)
    return plan


def plan_for(root: int, pids: Iterable[int]) -> NetPlan:
    """The connections held by the tree ``pids`` whose namespace is that of ``root``."""
    rows: list[tuple[int, int, Endpoint, Endpoint]] = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{root}/net/{table}") as f:
                rows += parse_tcp_table(f.read())
        except OSError:
            continue
    return classify(rows, socket_inodes(pids))


def close_connections(pid: int, peers: Iterable[tuple[str, int]], *, userns: bool) -> list[str]:
    """Close (SOCK_DESTROY, ``ss -K``) the connections to ``peers`` in the network namespace of ``pid``.

    The program sees ECONNABORTED, as after a network failure, instead of a
    connection that silently leads nowhere. Returns what could not be closed.
    """
    failed: list[str] = []
    enter = ["nsenter", f"--target={pid}", *(["--user", "--preserve-credentials"] if userns else []), "--net", "--"]
    for host, port in peers:
        argv = [*enter, "ss", "-K", "-n", "dst", host, "dport", "=", str(port)]
        try:
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            failed.append(f"{host}:{port}: {exc}")
            continue
        if res.returncode != 0:
            failed.append(f"{host}:{port}: {res.stderr.strip()[-200:]}")
    return failed
