"""Real CRIU tests need root (or a criu with capabilities) and a working 'criu check'."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hpcckpt.errors import HpcckptError


@pytest.fixture(scope="session")
def criu_ok() -> None:
    from hpcckpt.criu.engine import Criu

    if os.geteuid() != 0:
        pytest.skip("the CRIU job tests need root (PID namespaces)")
    try:
        criu = Criu.locate()
    except HpcckptError as err:
        pytest.skip(f"no criu: {err}")
    ok, out = criu.check()
    if not ok:
        pytest.skip(f"criu check fails here: {out[-300:]}")


@pytest.fixture
def work(tmp_path: Path, criu_ok: None) -> Path:
    (tmp_path / "store").mkdir()
    return tmp_path


@pytest.fixture
def outside_server() -> Iterator[tuple[str, int, list[socket.socket]]]:
    """A TCP server on this machine's own non-loopback address: outside the job, inside the machine."""
    addrs = [a.address for nic, lst in psutil.net_if_addrs().items() if nic != "lo"
             for a in lst if a.family == socket.AF_INET and not a.address.startswith("127.")]
    assert addrs, "this machine has no non-loopback IPv4 address for the job to reach"
    srv = socket.socket()
    srv.bind((addrs[0], 0))
    srv.listen()
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)
            threading.Thread(target=lambda c=conn: [None for _ in iter(lambda: c.recv(4096), b"")],
                             daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield addrs[0], srv.getsockname()[1], accepted
    srv.close()
    for c in accepted:
        c.close()
