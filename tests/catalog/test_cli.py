"""`hpcckpt list`, `gc` and `catalog check|rebuild`, in process and as real separate users."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from hpcckpt.catalog import Catalog
from hpcckpt.cli.main import main
from hpcckpt.context import User
from hpcckpt.exitcodes import EXIT_CATALOG, EXIT_PERMISSION
from hpcckpt.store.images import Store
from tests.security.users import REPO, ensure_user, hpcckpt_as, run_as, unreachable_path_component


@pytest.fixture(autouse=True)
def _no_site_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The machine's own /etc/hpcckpt policy must not leak into these tests.
    site = tmp_path / "site-policy.yaml"
    site.write_text("{}\n")
    monkeypatch.setenv("HPCCKPT_SITE_POLICY", str(site))
    monkeypatch.delenv("HPCCKPT_POLICY", raising=False)
    monkeypatch.delenv("HPCCKPT_CATALOG", raising=False)


def _fill(cat: Catalog, store_root: Path, me: User, jobs: list[str]) -> list[int]:
    ids = []
    for job in jobs:
        with Store(store_root, me).publish(cat, job_id=job, engine="criu", node="node1") as pub:
            pub.file.write(b"x" * 2048)
        ids.append(pub.ckptid)
    return ids


def _args(store_root: Path, url: str | None) -> list[str]:
    return ["--store", str(store_root), *(["--catalog", url] if url else [])]


def test_list_json_and_table(cat: Catalog, catalog_url: str | None, store_root: Path, me: User,
                             capsys: pytest.CaptureFixture[str]) -> None:
    ids = _fill(cat, store_root, me, ["4242", "4242", "77"])
    assert main(["list", "--json", "4242", *_args(store_root, catalog_url)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["ckptid"] for d in doc] == ids[:2]
    for key in ("ckptid", "job_id", "status", "size_bytes", "created", "node", "path", "parent"):
        assert key in doc[0]
    assert doc[0]["status"] == "committed" and doc[0]["size_bytes"] == 2048

    assert main(["list", *_args(store_root, catalog_url)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["CKPTID", "JOB", "STEP", "STATUS"]
    assert [ln.split()[0] for ln in lines[1:]] == [str(i) for i in ids]
    assert "2.0 KiB" in lines[1]


def test_gc_and_check_exit_codes(cat: Catalog, catalog_url: str | None, store_root: Path, me: User,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    ids = _fill(cat, store_root, me, ["9"] * 4)
    assert main(["gc", "--dry-run", "--json", "--keep-last", "1", *_args(store_root, catalog_url)]) == 0
    doc = json.loads(capsys.readouterr().out)
    # keep_last 1, and (retention.fallback_full, the default) the newest full image outside the newest chain
    assert doc[0]["retention"]["deleted"] == ids[:2] and doc[0]["dry_run"] is True
    assert main(["gc", "--keep-last", "1", *_args(store_root, catalog_url)]) == 0
    latest = cat.latest("9")
    assert latest is not None and latest.ckptid == ids[3]
    assert sorted(r.ckptid for r in cat.committed("9")) == ids[2:]

    assert main(["catalog", "check", *_args(store_root, catalog_url)]) == 0
    os.unlink(Path(latest.path))
    capsys.readouterr()
    assert main(["catalog", "check", "--json", *_args(store_root, catalog_url)]) == EXIT_CATALOG
    findings = json.loads(capsys.readouterr().out)[0]["findings"]
    assert [(f["kind"], f["ckptid"]) for f in findings] == [("missing_file", ids[3])]


def test_catalog_rebuild_cli(store_root: Path, me: User, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = pytest.importorskip("hpcckpt.image")
    from hpcckpt.catalog import open_catalog

    cat = open_catalog(None, store_root, me)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 100)
    with Store(store_root, me).publish(cat, job_id="31", engine="files", node="n") as pub:
        image.pack_dir(src, pub.file, image.ImageMeta(ckptid=pub.ckptid, job_id="31", engine="files",
                                                      uid=me.uid, user=me.name, node="n"))
    cat.close()
    os.unlink(store_root / me.name / "catalog.sqlite")
    assert main(["catalog", "rebuild", "--json", "--store", str(store_root)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["added"] == [pub.ckptid]
    assert main(["list", "--json", "--store", str(store_root)]) == 0
    assert [d["ckptid"] for d in json.loads(capsys.readouterr().out)] == [pub.ckptid]


@pytest.mark.multiuser
def test_users_see_only_their_own_checkpoints(store_root: Path) -> None:
    alice, bob = ensure_user("alice"), ensure_user("bob")
    blocked = unreachable_path_component(REPO, alice)
    if blocked is not None:
        pytest.skip(f"{blocked} is not searchable by the test users")
    os.chmod(store_root, 0o1777)  # a shared store root, as on a parallel filesystem
    env = {"PYTHONPATH": str(REPO), "HPCCKPT_STORE": str(store_root)}
    for user, job in ((alice, "100"), (bob, "200")):
        p = run_as(user, [sys.executable, "-m", "tests.catalog._worker", "commits", str(store_root), "-", job, "2"],
                   env=env, cwd=REPO)
        assert p.returncode == 0, p.stderr
    seen = {}
    for user in (alice, bob):
        p = hpcckpt_as(user, ["list", "--json"], env={"HPCCKPT_STORE": str(store_root)})
        assert p.returncode == 0, p.stderr
        seen[user.name] = {(d["user"], d["job_id"]) for d in json.loads(p.stdout)}
    assert seen == {"alice": {("alice", "100")}, "bob": {("bob", "200")}}

    p = hpcckpt_as(alice, ["list", "--user", "bob"], env={"HPCCKPT_STORE": str(store_root)})
    assert p.returncode == EXIT_PERMISSION and "only root" in p.stderr
    # The kernel agrees: alice cannot even read bob's directory.
    p = run_as(alice, ["ls", str(store_root / "bob")])
    assert p.returncode != 0

    # Root sees everyone.
    out = json.loads(_root_list(store_root))
    assert {(d["user"], d["job_id"]) for d in out} == {("alice", "100"), ("bob", "200")}


def _root_list(store_root: Path) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["list", "--json", "--store", str(store_root)]) == 0
    return buf.getvalue()
