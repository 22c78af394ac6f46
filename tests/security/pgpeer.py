"""A throwaway PostgreSQL 15 server with peer authentication, for the row-level security tests.

Peer authentication is the point: the server itself learns the Unix user of
each client over the socket, so alice cannot claim to be bob. (The catalog's
own test server may use trust auth, which would prove nothing here.) The
server runs as ``postgres`` in a directory the test users can reach, and is
stopped by its pid.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpcckpt.catalog.pg_security import ADMIN_ROLE, hba_config

PG_BIN = Path(os.environ.get("HPCCKPT_PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASE = "hpcckpt"


@dataclass
class PeerServer:
    base: Path
    sock_dir: Path
    port: int
    proc: subprocess.Popen[bytes]

    def url(self, role: str | None = None, database: str = DATABASE) -> str:
        """The socket URL; without ``role`` libpq asks for the Unix user's own (hpcckpt: the admin for root)."""
        url = f"postgresql:///{database}?host={self.sock_dir}&port={self.port}"
        return f"{url}&user={role}" if role else url

    def psql_argv(self, role: str, sql: str) -> list[str]:
        return ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.sock_dir), "-p", str(self.port),
                "-U", role, "-d", DATABASE, "-c", sql]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(argv: list[str], **kw: object) -> list[str]:
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *argv]


def start(base: Path, databases: Sequence[str] = (DATABASE,)) -> PeerServer:
    """initdb and start a server under ``base`` (which must be traversable by everyone).

    pg_hba.conf holds hpcckpt's peer-map lines for each of ``databases``, then rejects everything else.
    """
    if not (PG_BIN / "initdb").exists() or shutil.which("psql") is None:
        raise FileNotFoundError(f"PostgreSQL 15 binaries not found in {PG_BIN}")
    pg = pwd.getpwnam("postgres")
    base.mkdir(mode=0o755)
    os.chown(base, pg.pw_uid, pg.pw_gid)
    data, sock = base / "data", base / "sock"
    sock.mkdir(mode=0o755)
    os.chown(sock, pg.pw_uid, pg.pw_gid)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(base)}
    subprocess.run(
        _as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=peer",
                      "--auth-host=reject", "--no-sync", "-E", "UTF8"]),
        check=True, capture_output=True, env=env, cwd=str(base),
    )
    hba = "".join(hba_config(db)[0] for db in databases)
    ident = hba_config(DATABASE)[1]
    (data / "pg_hba.conf").write_text(
        "local  all  postgres  peer\n" + hba + "local  all  all  reject\n"
    )
    (data / "pg_ident.conf").write_text(ident)
    port = _free_port()
    log = open(base / "server.log", "wb")  # noqa: SIM115 - the server writes it until stop()
    os.chown(base / "server.log", pg.pw_uid, pg.pw_gid)
    proc = subprocess.Popen(
        _as_postgres([str(PG_BIN / "postgres"), "-D", str(data), "-k", str(sock), "-p", str(port),
                      "-c", "listen_addresses=", "-c", "fsync=off", "-c", "shared_buffers=16MB"]),
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(base),
    )
    server = PeerServer(base, sock, port, proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited: {(base / 'server.log').read_text(errors='replace')[-2000:]}")
        ready = subprocess.run([str(PG_BIN / "pg_isready"), "-h", str(sock), "-p", str(port)],
                               capture_output=True, check=False)
        if ready.returncode == 0:
            return server
        time.sleep(0.1)
    server.stop()
    raise TimeoutError("postgres did not become ready in 60 s")


def superuser_sql(server: PeerServer, sql: str, db: str = "postgres") -> str:
    argv = server.psql_argv("postgres", sql)
    argv[argv.index("-d") + 1] = db
    res = subprocess.run(_as_postgres(argv), capture_output=True, text=True, check=False,
                         env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/")
    if res.returncode != 0:
        raise RuntimeError(f"psql as postgres failed: {res.stderr}")
    return res.stdout


@contextlib.contextmanager
def catalog_server(databases: Sequence[str] = (DATABASE,)) -> Iterator[PeerServer]:
    """A started server with the admin role and ``databases`` owned by it, as a site sets it up.

    Raises FileNotFoundError when PostgreSQL is not installed (callers skip).
    """
    base = Path(tempfile.mkdtemp(prefix="hpcckpt-pg-", dir="/tmp"))
    base.chmod(0o755)
    try:
        srv = start(base / "pg", databases)
        try:
            superuser_sql(srv, f"CREATE ROLE {ADMIN_ROLE} LOGIN CREATEROLE")
            for db in databases:
                superuser_sql(srv, f"CREATE DATABASE {db} OWNER {ADMIN_ROLE}")
            yield srv
        finally:
            srv.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
