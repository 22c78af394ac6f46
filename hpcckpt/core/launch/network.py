"""A job's own network namespace and its link to the outside (policy ``job.network``).

Why a network namespace per job: most HPC codes link MPI, and an MPI
program holds TCP connections inside its own tree (OpenMPI's singleton
``MPI_Init`` talks to the ``orted`` it forks; ``mpirun`` talks to its ranks).
CRIU can carry such connections (``--tcp-established``), but in the node's
own namespace it must lock the host's firewall around every dump (which
needs iptables or nftables there) and a restore on a node where the same
ports are taken fails ("Can't bind inet socket ... Address already in
use"), which is exactly the node where a killed job is resumed at once.
In a namespace of its own the job's loopback is its own: every carried
connection has both ends in the frozen tree, so nothing needs locking, and
a restore into a fresh namespace cannot clash with anything.

The job still reaches the outside through ``slirp4netns``: a user-mode
TCP/IP stack that rootless Podman, Docker and BuildKit use, packaged by
Debian, that works for ordinary users (the job's user namespace) as well
as for root, and forwards nothing inbound. It attaches a ``tap0`` with
10.0.2.100/24 and a default route; connections leave from the node's own
address. Its exit is tied to a pipe the runner holds, so it ends with the
runner. Without slirp4netns a private job has loopback only (``doctor``
says so).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

from hpcckpt import log as hlog
from hpcckpt.core.launch.spawn import needs_user_namespace
from hpcckpt.criu.netplan import close_connections
from hpcckpt.errors import EngineError

_log = hlog.get("runner.network")

PRIVATE, HOST = "private", "host"
MODES = (PRIVATE, HOST)
HELPER = "slirp4netns"
TAP = "tap0"
_READY_TIMEOUT = 10.0
_EXTRA_PATH = ("/usr/bin", "/usr/local/bin", "/bin")


def helper_path() -> str | None:
    """The slirp4netns binary, or None when the node has none."""
    return shutil.which(HELPER, path=os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH]))


@dataclass
class OutsideLink:
    """A running slirp4netns serving one job's namespace; ``close()`` ends it."""

    proc: subprocess.Popen[bytes] | None
    exit_w: int

    def close(self) -> None:
        if self.exit_w >= 0:
            try:
                os.close(self.exit_w)  # slirp4netns exits when this pipe closes (--exit-fd)
            except OSError:
                pass
            self.exit_w = -1
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def attach_outside(pid: int, *, userns: bool, helper: str | None = None) -> OutsideLink | None:
    """Give the network namespace of host pid ``pid`` a route to the outside; None without a helper.

    ``userns``: the namespace belongs to the job's own user namespace (an
    ordinary user's job), which slirp4netns must join to configure it.
    """
    path = helper or helper_path()
    if path is None:
        hlog.event(_log, "network.no_helper", f"{HELPER} is not installed: the job has loopback only, "
                   "no connections to the outside (install slirp4netns; see docs/limits.md)", 30)
        return None
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    os.set_inheritable(exit_w, False)
    argv = [path, "--configure", "--mtu=65520", "--disable-host-loopback",
            f"--ready-fd={ready_w}", f"--exit-fd={exit_r}"]
    if userns:
        argv.append(f"--userns-path=/proc/{pid}/ns/user")
    argv += ["--netns-type=path", f"/proc/{pid}/ns/net", TAP]
    t0 = time.monotonic()
    # Its chatter goes to an unlinked file (a pipe we stopped reading would kill it with SIGPIPE).
    with tempfile.TemporaryFile() as errlog:
        try:
            # Its own session: a terminal's ^C goes to the runner, which ends the helper in order.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=errlog, pass_fds=(ready_w, exit_r), start_new_session=True)
        except OSError as exc:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            raise EngineError(f"cannot start {path}: {exc.strerror}",
                              hint="check the slirp4netns install") from exc
        os.close(ready_w)
        os.close(exit_r)
        link = OutsideLink(proc, exit_w)
        try:
            ready, _, _ = select.select([ready_r], [], [], _READY_TIMEOUT)
            got = os.read(ready_r, 1) if ready else b""
        finally:
            os.close(ready_r)
        if got != b"1":
            link.close()
            errlog.seek(0)
            err = errlog.read().decode(errors="replace").strip()
            raise EngineError(f"{HELPER} could not attach to the job's network namespace (pid {pid})",
                              log_excerpt=err[-2000:],
                              hint="set job.network: host in a policy to run without a namespace of its own, "
                                   "and see 'hpcckpt doctor'")
    hlog.event(_log, "network.attached", f"{HELPER} attached to pid {pid}", 10,
               seconds=round(time.monotonic() - t0, 4))
    return link


class JobNetwork:
    """The network side of one run: the job's outside link, attached at start or restore, closed at the end."""

    def __init__(self, mode: str, outside: bool) -> None:
        self.mode = mode
        self.outside = outside
        self.link: OutsideLink | None = None

    @property
    def private(self) -> bool:
        return self.mode == PRIVATE

    def attach(self, pid: int) -> None:
        """Called with the pid holding the job's fresh namespace, before the job (or CRIU) starts in it."""
        if self.private and self.outside and self.link is None:
            try:
                self.link = attach_outside(pid, userns=needs_user_namespace())
            except EngineError as err:
                # The job itself does not depend on it: most jobs never leave their node. Run on, loudly.
                hlog.event(_log, "network.no_outside", f"{err}; the job runs with loopback only, without "
                           f"connections to the outside: {err.log_excerpt.strip()[-300:]}", 30)

    def after_restore(self, pid: int, extra: Mapping[str, object]) -> None:
        """Close the connections to outside peers that the image carried (job.external_connections: close)."""
        peers = extra.get("external_connections")
        if not isinstance(peers, list) or not peers:
            return
        wanted = [(str(p[0]), int(p[1])) for p in peers if isinstance(p, list) and len(p) == 2]
        failed = close_connections(pid, wanted, userns=needs_user_namespace())
        hlog.event(_log, "network.closed_external", f"closed {len(wanted) - len(failed)} connection(s) to peers "
                   "outside the job that the checkpoint carried", 20 if not failed else 30, failed=failed)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
