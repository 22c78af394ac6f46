"""A throwaway, real PostgreSQL server for tests and benchmarks.

initdb runs as the unprivileged ``postgres`` user (PostgreSQL refuses to run
as root) into a fresh temp dir; the server listens on 127.0.0.1 at a free port
and on a unix socket inside that dir, and is stopped by the pid we started,
never by name.

    with PgServer() as pg:
        url = pg.create_database("t1")
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")
SUPERUSER = "hpcckpt"


class PgUnavailable(RuntimeError):
    """No PostgreSQL server binaries, or no unprivileged user to run them."""


def find_bin() -> Path:
    for cand in PG_BIN_CANDIDATES:
        if Path(cand, "initdb").exists() and Path(cand, "postgres").exists():
            return Path(cand)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PgUnavailable("PostgreSQL server binaries (initdb, postgres) not found")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self, *, run_as: str = "postgres", startup_timeout: float = 60.0) -> None:
        self.bin = find_bin()
        try:
            self.pw = pwd.getpwnam(run_as)
        except KeyError as exc:
            raise PgUnavailable(f"no system user {run_as!r} to run PostgreSQL as") from exc
        self.startup_timeout = startup_timeout
        self.base = Path(tempfile.mkdtemp(prefix="hpcckpt-pg-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_dir(self) -> Path:
        return self.base

    def _as_pg(self) -> tuple[int | None, int | None, list[int] | None]:
        """(user, group, extra_groups) for subprocess: PostgreSQL refuses to run as root."""
        if os.getuid() != 0:
            return None, None, None  # a non-root test run uses its own identity
        return self.pw.pw_uid, self.pw.pw_gid, []

    def start(self) -> PgServer:
        if os.getuid() == 0:
            os.chown(self.base, self.pw.pw_uid, self.pw.pw_gid)
        os.chmod(self.base, 0o700)
        uid, gid, groups = self._as_pg()
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
             "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.base,
            user=uid, group=gid, extra_groups=groups,
        )
        log = open(self.base / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", str(self.socket_dir),
             "-c", "max_connections=200", "-c", "shared_buffers=64MB"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.base, start_new_session=True,
            user=uid, group=gid, extra_groups=groups,
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        tail = (self.base / "server.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise PgUnavailable(f"PostgreSQL did not start: {last}\n{tail}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT is PostgreSQL's "fast shutdown": abort sessions, then exit cleanly.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        with contextlib.suppress(OSError):
            shutil.rmtree(self.base)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
