"""The runner's control socket: how ``hpcckpt checkpoint JOBID`` reaches a running job.

Protocol: one request per connection, each a single JSON object on one line,
answered by one JSON line::

    -> {"op": "checkpoint", "stop": false}
    <- {"ok": true, "ckptid": 17, "path": "...", "frozen_s": 0.41}
    <- {"ok": false, "error": "criu dump ... failed", "exit_code": 8}
    -> {"op": "status"}
    <- {"ok": true, "job_id": "4242", "pid": 1234, "last_ckptid": 17, ...}

Where: ``$XDG_RUNTIME_DIR/hpcckpt/<safe job id>.sock``, else
``/tmp/hpcckpt-<uid>/<safe job id>.sock``. The directory is 0700 and must
be owned by the user (a directory another user planted in /tmp is refused,
never followed), and the server also checks each peer's uid (SO_PEERCRED):
only the job's owner and root may ask for a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

from hpcckpt.errors import RunnerUnreachableError, UsageError
from hpcckpt.fs.safe import open_private_dir, safe_job_component

_MAX_REQUEST = 64 * 1024
_UCRED = struct.Struct("<iII")  # struct ucred: pid, uid, gid (native is little-endian on our targets)


def socket_dir(uid: int | None = None, environ: dict[str, str] | None = None) -> tuple[Path, Path]:
    """``(base, dir)``: the trusted base and the private directory below it."""
    uid = os.getuid() if uid is None else uid
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == uid:
        return Path(xdg), Path(xdg) / "hpcckpt"
    return Path("/tmp"), Path("/tmp") / f"hpcckpt-{uid}"


def socket_path(job_id: str, uid: int | None = None, environ: dict[str, str] | None = None) -> Path:
    _base, d = socket_dir(uid, environ)
    return d / f"{safe_job_component(job_id)}.sock"


def _ensure_dir(uid: int, gid: int) -> Path:
    base, d = socket_dir(uid)
    os.close(open_private_dir(d, uid, gid, base=base, create=True))
    return d


class ControlServer:
    """A listening socket the runner polls from its main loop (no thread of its own)."""

    def __init__(self, job_id: str, *, uid: int | None = None, gid: int | None = None) -> None:
        self.uid = os.getuid() if uid is None else uid
        gid = os.getgid() if gid is None else gid
        _ensure_dir(self.uid, gid)
        self.path = socket_path(job_id, self.uid)
        if len(os.fsencode(self.path)) > 107:
            raise UsageError(f"control socket path too long: {self.path}",
                             hint="set XDG_RUNTIME_DIR to a shorter directory or use a shorter --job-id")
        with contextlib.suppress(FileNotFoundError):
            # A stale socket of a dead runner; a live one would still answer.
            if _alive(self.path):
                raise UsageError(f"another runner for job {job_id} is running (socket {self.path})",
                                 hint="give this run its own --job-id")
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(os.fspath(self.path))
        os.chmod(self.path, 0o600)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, dict[str, Any]] | None:
        """One pending request, or None. Refuses (and answers) peers that are not the owner or root."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        conn.setblocking(True)
        conn.settimeout(10)
        try:
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            _pid, peer_uid, _gid = _UCRED.unpack(cred)
            if peer_uid not in (0, self.uid):
                reply(conn, {"ok": False, "error": "not the owner of this job", "exit_code": 10})
                return None
            line = _read_line(conn)
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError("request must be a JSON object with 'op'")
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                reply(conn, {"ok": False, "error": f"bad request: {exc}", "exit_code": 2})
            return None
        return conn, req

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > _MAX_REQUEST:
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0]


def reply(conn: socket.socket, doc: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(doc, default=str).encode() + b"\n")
    finally:
        conn.close()


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def request(job_id: str, doc: dict[str, Any], *, timeout: float = 900.0, uid: int | None = None) -> dict[str, Any]:
    """Send one request to job ``job_id``'s runner and return its answer."""
    path = socket_path(job_id, uid)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise RunnerUnreachableError(
                f"no runner for job {job_id} is listening on {path}",
                hint="is the job running on this node under 'hpcckpt run'? checkpoint requests are node-local",
            ) from exc
        except PermissionError as exc:
            raise RunnerUnreachableError(f"{path}: permission denied",
                                         hint="only the job's owner (or root) can reach its runner") from exc
        s.sendall(json.dumps(doc).encode() + b"\n")
        try:
            line = _read_line(s)
        except TimeoutError as exc:
            raise RunnerUnreachableError(f"the runner of job {job_id} did not answer within {timeout:.0f} s") from exc
    finally:
        s.close()
    if not line:
        raise RunnerUnreachableError(f"the runner of job {job_id} closed the connection without answering")
    try:
        ans = json.loads(line)
    except ValueError as exc:
        raise RunnerUnreachableError(f"the runner of job {job_id} sent a malformed answer: {line[:200]!r}") from exc
    if not isinstance(ans, dict):
        raise RunnerUnreachableError(f"the runner of job {job_id} sent a malformed answer")
    return ans
