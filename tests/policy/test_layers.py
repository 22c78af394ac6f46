"""Precedence of the layers, origins, locks and bounds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hpcckpt.errors import PolicyError
from hpcckpt.policy import PolicyInvalidError, build_policy, load_policy

Write = Callable[[str, str], Path]

SITE = """\
interval: 2h
storage:
  root: /scratch/hpcckpt
retention:
  keep_last: 4
locks: [storage.root, criu]
bounds:
  interval: {min: 5m, max: 1d}
  retention.max_bytes: {max: 500G}
  pipeline:
    full_every: {min: 4}
site: {mtbf: 24h}
"""


def _messages(err: pytest.ExceptionInfo[PolicyInvalidError]) -> list[str]:
    return [str(d) for d in err.value.diagnostics]


def test_defaults_alone() -> None:
    pol = build_policy(None, None, {})
    assert pol.interval == 3600
    assert pol.retention.keep_last == 3
    assert pol.storage.compression.codec == "zstd" and pol.storage.compression.level == 3
    assert pol.preemption.signals == ["TERM", "USR1"]
    assert pol.pipeline.chunk_size == 4 << 20
    assert pol.mpi.coordination_timeout == 300
    assert pol.site.mtbf is None
    assert pol.origin("interval") == "default"


def test_each_layer_overrides_the_one_before(write: Write) -> None:
    site = write("site.yaml", SITE)
    user = write("user.yaml", "interval: 30m\nretention:\n  keep_last: 6\nengine: app\n")
    pol = build_policy(user, site, {"interval": "10m"})
    assert pol.interval == 600 and pol.origin("interval") == "cli:--interval"
    assert pol.retention.keep_last == 6 and pol.origin("retention.keep_last") == f"user:{user}:3"
    assert pol.engine == "app" and pol.origin("engine") == f"user:{user}:4"
    assert pol.storage.root == "/scratch/hpcckpt" and pol.origin("storage.root") == f"site:{site}:3"
    assert pol.criu.file_locks is True and pol.origin("criu.file_locks") == "default"
    # Without the flag the user's value wins; without the user file, the site's.
    assert build_policy(user, site, {}).interval == 1800
    assert build_policy(None, site, {}).interval == 7200


def test_cli_flag_names_are_reported(write: Write) -> None:
    pol = build_policy(None, None, {"retention.keep_last": "7"}, cli_flags={"retention.keep_last": "--keep-last"})
    assert pol.retention.keep_last == 7 and pol.origin("retention.keep_last") == "cli:--keep-last"
    with pytest.raises(PolicyInvalidError) as err:
        build_policy(None, None, {"retention.keep_last": "seven"}, cli_flags={"retention.keep_last": "--keep-last"})
    assert _messages(err) == ["--keep-last: retention.keep_last: expected a positive integer, got 'seven'"]


def test_cli_strings_are_typed() -> None:
    pol = build_policy(None, None, {"criu.tcp_established": "yes", "preemption.signals": "SIGUSR2,term",
                                    "pipeline.max_chain_ratio": "3.5", "retention.max_bytes": "1.5TiB",
                                    "storage.root": "null"})
    assert pol.criu.tcp_established is True
    assert pol.preemption.signals == ["USR2", "TERM"]
    assert pol.pipeline.max_chain_ratio == 3.5
    assert pol.retention.max_bytes == int(1.5 * (1 << 40))
    assert pol.storage.root is None


def test_lock_refuses_user_and_cli(write: Write) -> None:
    site = write("site.yaml", SITE)
    user = write("user.yaml", "retention:\n  keep_last: 5\nstorage:\n  root: /home/u/ckpt\ncriu:\n"
                              "  link_remap: true\n")
    with pytest.raises(PolicyInvalidError) as err:
        build_policy(user, site, {"criu.tcp_established": "true"})
    assert _messages(err) == [
        f"{user}:4:3: storage.root is locked by the site policy ({site}:6:9); remove it from your policy",
        f"{user}:6:3: criu.link_remap is locked by the site policy ({site}:6:23); remove it from your policy",
        f"--set criu.tcp_established: criu.tcp_established is locked by the site policy ({site}:6:23); "
        "remove the flag",
    ]


def test_locked_keys_are_marked(write: Write) -> None:
    pol = build_policy(None, write("site.yaml", SITE), {})
    assert pol.is_locked("storage.root") and pol.is_locked("criu.extra_args")
    assert not pol.is_locked("storage.staging")
    assert pol.locks == ("storage.root", "criu")


def test_bounds_refuse_values_written_outside(write: Write) -> None:
    site = write("site.yaml", SITE)
    user = write("user.yaml", "interval: 1m\nretention:\n  max_bytes: 2T\npipeline:\n  full_every: 2\n")
    with pytest.raises(PolicyInvalidError) as err:
        build_policy(user, site, {})
    assert _messages(err) == [
        f"{user}:1:11: interval: 1m is below the site minimum 5m ({site}:8:3)",
        f"{user}:3:14: retention.max_bytes: 2TiB is above the site maximum 500GiB ({site}:9:3)",
        f"{user}:5:15: pipeline.full_every: 2 is below the site minimum 4 ({site}:11:5)",
    ]
    with pytest.raises(PolicyInvalidError) as err:
        build_policy(write("u2.yaml", "retention: {max_bytes: null}\n"), site, {"interval": "2d"})
    assert [m.split(" (")[0] for m in _messages(err)] == [
        f"{site.parent}/u2.yaml:1:24: retention.max_bytes: null",
        "--interval: interval: 2d is above the site maximum 1d",
    ]


def test_bounds_move_defaults_onto_the_limit(write: Write) -> None:
    site = write("site.yaml", SITE)
    pol = build_policy(None, site, {})
    # Defaults: max_bytes unlimited, full_every 8 (inside); interval is the site's own 2h.
    assert pol.retention.max_bytes == 500 << 30
    assert pol.origin("retention.max_bytes") == f"site:{site}:9"
    assert pol.pipeline.full_every == 8 and pol.origin("pipeline.full_every") == "default"
    assert pol.bounds["interval"].minimum == 300 and pol.bounds["interval"].maximum == 86400
    tight = write("tight.yaml", "bounds:\n  interval: {max: 30m}\n")
    pol = build_policy(None, tight, {})
    assert pol.interval == 1800 and pol.origin("interval") == f"site:{tight}:2"


def test_values_inside_bounds_pass(write: Write) -> None:
    site = write("site.yaml", SITE)
    user = write("user.yaml", "interval: 5m\nretention: {max_bytes: 500G}\n")
    pol = build_policy(user, site, {})
    assert pol.interval == 300 and pol.retention.max_bytes == 500 << 30


def test_all_layers_report_together(write: Write) -> None:
    site = write("site.yaml", "retention: {keep_last: zero}\n")
    user = write("user.yaml", "engine: criuu\n")
    with pytest.raises(PolicyInvalidError) as err:
        build_policy(user, site, {"interval": "soon"})
    assert [m.split(":")[0] for m in _messages(err)] == [str(site), str(user), "--interval"]


def test_environment_selects_files(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    site = write("site.yaml", "interval: 2h\n")
    user = write("user.yaml", "retention: {keep_last: 9}\n")
    monkeypatch.setenv("HPCCKPT_SITE_POLICY", str(site))
    monkeypatch.setenv("HPCCKPT_POLICY", str(user))
    pol = load_policy()
    assert pol.interval == 7200 and pol.retention.keep_last == 9
    assert pol.sources == (f"site:{site}", f"user:{user}")
    # An explicit file beats the environment.
    other = write("other.yaml", "retention: {keep_last: 2}\n")
    assert load_policy(user_file=other).retention.keep_last == 2


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nope\.yaml: cannot read user policy: No such file"):
        build_policy(tmp_path / "nope.yaml", None, {})


def test_empty_file_and_empty_sections(write: Write) -> None:
    assert build_policy(write("e.yaml", ""), None, {}) == build_policy(None, None, {})
    assert build_policy(write("c.yaml", "# nothing\nstorage:\n"), None, {}).storage.root is None


def test_digest_is_stable_and_tracks_values(write: Write) -> None:
    a = build_policy(None, None, {})
    b = build_policy(write("same.yaml", "interval: 1h\n"), None, {})
    c = build_policy(None, None, {"interval": "61m"})
    assert a.digest() == b.digest() != c.digest()
    assert len(a.digest()) == 64
    assert a.origin("interval") != b.origin("interval")  # provenance does not change the digest


def test_unknown_origin_key() -> None:
    pol = build_policy(None, None, {})
    with pytest.raises(PolicyError, match="did you mean 'interval'"):
        pol.origin("intervall")


def test_to_dict_is_nested_plain_data() -> None:
    d = build_policy(None, None, {}).to_dict()
    assert d["storage"]["compression"] == {"codec": "zstd", "level": 3}
    assert "origins" not in d and d["site"]["interval_max"] == 86400
