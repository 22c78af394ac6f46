"""Table of invalid policies, each with the exact messages it must produce.

``{f}`` in an expected line stands for the policy file's path. A case is
(id, layer, policy text, expected lines); layer "user" is checked as a user
policy with no site policy, "site" as a site policy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hpcckpt.exitcodes import EXIT_POLICY
from hpcckpt.policy import PolicyInvalidError, build_policy

CASES: list[tuple[str, str, str, list[str]]] = [
    ("typo-top", "user", "intreval: 10m\n",
     ["{f}:1:1: unknown key 'intreval' (did you mean 'interval'?)"]),
    ("typo-nested", "user", "retention:\n  keep_lst: 3\n",
     ["{f}:2:3: unknown key 'retention.keep_lst' (did you mean 'retention.keep_last'?)"]),
    ("wrong-section", "user", "keep_last: 3\n",
     ["{f}:1:1: unknown key 'keep_last' (did you mean 'retention.keep_last'?)"]),
    ("unknown-no-match", "user", "zzzz: 1\n",
     ["{f}:1:1: unknown key 'zzzz'"]),
    ("int-word", "user", "retention:\n  keep_last: three\n",
     ["{f}:2:14: retention.keep_last: expected a positive integer, got 'three'"]),
    ("int-zero", "user", "retention:\n  keep_last: 0\n",
     ["{f}:2:14: retention.keep_last: expected a positive integer, got 0"]),
    ("int-negative", "user", "retention: {keep_every: -2}\n",
     ["{f}:1:25: retention.keep_every: expected a non-negative integer, got -2"]),
    ("int-bool", "user", "failure:\n  max_restarts: true\n",
     ["{f}:2:17: failure.max_restarts: expected a non-negative integer, got true"]),
    ("int-float", "user", "pipeline:\n  full_every: 2.5\n",
     ["{f}:2:15: pipeline.full_every: expected a positive integer, got 2.5"]),
    ("bool-word", "user", "criu:\n  file_locks: maybe\n",
     ["{f}:2:15: criu.file_locks: expected true or false, got 'maybe'"]),
    ("enum-typo", "user", "engine: ciru\n",
     ["{f}:1:9: engine: expected one of 'criu', 'app', got 'ciru' (did you mean 'criu'?)"]),
    ("enum-codec", "user", "storage:\n  compression:\n    codec: gzip\n",
     ["{f}:3:12: storage.compression.codec: expected one of 'none', 'zstd', 'lz4', got 'gzip'"]),
    ("duration-bad", "user", "interval: 10 minutes\n",
     ["{f}:1:11: interval: expected a duration such as 30, 30s, 10m, 1h30m or 2d, or 'auto', "
      "of at least 1s, got '10 minutes'"]),
    ("duration-auto-typo", "user", "interval: atuo\n",
     ["{f}:1:11: interval: expected a duration such as 30, 30s, 10m, 1h30m or 2d, or 'auto', "
      "of at least 1s, got 'atuo' (did you mean 'auto'?)"]),
    ("duration-zero", "user", "interval: 0\n",
     ["{f}:1:11: interval: expected a duration such as 30, 30s, 10m, 1h30m or 2d, or 'auto', "
      "of at least 1s, got 0"]),
    ("duration-unit", "user", "failure:\n  backoff: 5y\n",
     ["{f}:2:12: failure.backoff: expected a duration such as 30, 30s, 10m, 1h30m or 2d, got '5y'"]),
    ("size-bad", "user", "retention:\n  max_bytes: 5 gigs\n",
     ["{f}:2:14: retention.max_bytes: expected a size such as 4096, 64MiB, 500G or 1.5TiB, "
      "of at least 1, got '5 gigs'"]),
    ("size-range", "user", "pipeline:\n  chunk_size: 2G\n",
     ["{f}:2:15: pipeline.chunk_size: expected a size such as 4096, 64MiB, 500G or 1.5TiB, "
      "from 64KiB to 1GiB, got '2G'"]),
    ("float-low", "user", "pipeline:\n  max_chain_ratio: 0.5\n",
     ["{f}:2:20: pipeline.max_chain_ratio: expected a number >= 1, got 0.5"]),
    ("path-relative", "user", "storage:\n  root: scratch/ckpt\n",
     ["{f}:2:9: storage.root: expected an absolute path (or ~/...), or null, got 'scratch/ckpt'"]),
    ("catalog-url", "user", "storage: {catalog: 'mysql://db/x'}\n",
     ["{f}:1:20: storage.catalog: expected a postgresql:// or postgres:// URL, or an absolute path "
      "(or ~/...), or null, got 'mysql://db/x'"]),
    ("signal-typo", "user", "preemption:\n  signals: [TERM, USR3]\n",
     ["{f}:2:19: preemption.signals: expected a signal name such as TERM, USR1 or USR2, got 'USR3' "
      "(did you mean 'USR2'?)"]),
    ("signal-kill", "user", "preemption:\n  signals:\n    - KILL\n",
     ["{f}:3:7: preemption.signals: expected a signal name such as TERM, USR1 or USR2, got 'KILL' "
      "(it cannot be caught)"]),
    ("signal-empty", "user", "preemption: {signals: []}\n",
     ["{f}:1:23: preemption.signals: expected a non-empty list of signal names such as [TERM, USR1], "
      "got a list"]),
    ("section-scalar", "user", "storage: /scratch\n",
     ["{f}:1:10: storage: expected a section with keys root, staging, layout, catalog, compression, "
      "got '/scratch'"]),
    ("not-a-mapping", "user", "- interval: 1h\n",
     ["{f}:1:1: expected a mapping of policy keys at the top level, got a list"]),
    ("duplicate", "user", "interval: 1h\nengine: criu\ninterval: 2h\n",
     ["{f}:3:1: duplicate key 'interval' (first at line 1); remove one"]),
    ("syntax-colon", "user", "interval: 1h\nstorage:\n  root: /a: b\n",
     ["{f}:3:11: invalid YAML: mapping values are not allowed here"]),
    ("syntax-unclosed", "user", "preemption:\n  signals: [TERM, USR1\nengine: criu\n",
     ["{f}:3:7: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence at line "
      "2, column 12)"]),
    ("syntax-tab", "user", "criu:\n\tfile_locks: true\n",
     ["{f}:2:1: invalid YAML: found character '\\t' that cannot start any token"]),
    ("python-tag", "user", "engine: !!python/name:os.system criu\n",
     ["{f}:1:9: cannot use this YAML value: could not determine a constructor for the tag "
      "'tag:yaml.org,2002:python/name:os.system'"]),
    ("merge-key", "user", "base: &b {keep_last: 2}\nretention:\n  <<: *b\n",
     ["{f}:1:1: unknown key 'base'",
      "{f}:3:3: YAML merge keys ('<<') are not supported in policy files; write the keys out"]),
    ("user-locks", "user", "locks: [interval]\n",
     ["{f}:1:1: 'locks' can only be set in the site policy"]),
    ("user-site-key", "user", "site:\n  mtbf: 24h\n",
     ["{f}:2:3: site.mtbf can only be set in the site policy"]),
    ("criu-unsafe-arg", "user", "criu:\n  extra_args: ['--shell-job', '--action-script=/tmp/x']\n",
     ["{f}:2:31: criu.extra_args: '--action-script' is not allowed in a user policy (CRIU may run "
      "with root's privileges); allowed: --display-stats, --evasive-devices, --file-validation, "
      "--ghost-limit, --leave-stopped, --shell-job, --skip-file-rwx-check, --skip-in-flight, "
      "--tcp-close, --timeout, -v0, -v1, -v2, -v3, -v4. Ask your site to set it in the site policy"]),
    ("criu-arg-not-option", "site", "criu:\n  extra_args: ['--ghost-limit', '10M']\n",
     ["{f}:2:33: criu.extra_args: expected options that start with '-', got '10M'"]),
    ("level-for-codec", "user", "storage:\n  compression: {codec: lz4, level: 19}\n",
     ["{f}:2:36: storage.compression.level: expected an integer from 0 to 16 for codec 'lz4', got 19"]),
    ("margin-over-grace", "user", "preemption:\n  grace_margin: 1m\n",
     ["{f}:2:17: preemption.grace_margin (60s) must be less than preemption.grace_time (30s), "
      "or no time is left to checkpoint"]),
    ("auto-without-mtbf", "user", "interval: auto\n",
     ["{f}:1:11: interval: 'auto' needs site.mtbf (the mean time between failures) in the site "
      "policy; ask your site to set it, or give a fixed interval such as 1h"]),
    ("many-errors", "user", "interval: -1\nengine: java\nretention:\n  keep_last: x\n",
     ["{f}:1:11: interval: expected a duration such as 30, 30s, 10m, 1h30m or 2d, or 'auto', "
      "of at least 1s, got -1",
      "{f}:2:9: engine: expected one of 'criu', 'app', got 'java'",
      "{f}:4:14: retention.keep_last: expected a positive integer, got 'x'"]),
    ("site-lock-unknown", "site", "locks: [storage.rot]\n",
     ["{f}:1:9: locks: unknown key 'storage.rot' (did you mean 'storage.root'?)"]),
    ("site-bound-enum", "site", "bounds:\n  engine: {min: 1}\n",
     ["{f}:2:3: bounds: engine is not a number, duration or size and cannot be bounded; lock it "
      "instead (locks: [engine])"]),
    ("site-bound-minmax", "site", "bounds:\n  interval: {min: 2h, max: 1h}\n",
     ["{f}:2:13: bounds.interval: min 2h is above max 1h"]),
    ("site-bound-key", "site", "bounds:\n  interval: {minimum: 5m}\n",
     ["{f}:2:14: bounds.interval: unknown key 'minimum' (did you mean 'min'?)"]),
    ("site-bound-value", "site", "bounds:\n  retention.max_bytes: {max: lots}\n",
     ["{f}:2:30: bounds.retention.max_bytes.max: expected a size such as 4096, 64MiB, 500G or 1.5TiB, "
      "of at least 1, got 'lots'"]),
    ("site-own-bound", "site", "interval: 1m\nbounds:\n  interval: {min: 5m}\n",
     ["{f}:1:11: interval: 1m is below the site minimum 5m ({f}:3:3)"]),
    ("site-interval-range", "site", "site:\n  interval_min: 2h\n  interval_max: 1h\n",
     ["{f}:2:17: site.interval_min (7200s) is above site.interval_max (3600s)"]),
]


def _messages(layer: str, path: Path) -> list[str]:
    with pytest.raises(PolicyInvalidError) as info:
        if layer == "site":
            build_policy(None, path, {})
        else:
            build_policy(path, None, {})
    assert info.value.exit_code == EXIT_POLICY
    return [str(d) for d in info.value.diagnostics]


@pytest.mark.parametrize(("case", "layer", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_invalid_policy(
    write: Callable[[str, str], Path], case: str, layer: str, text: str, expected: list[str]
) -> None:
    path = write(f"{case}.yaml", text)
    assert _messages(layer, path) == [e.format(f=path) for e in expected]


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


def test_error_text_lists_every_problem(write: Callable[[str, str], Path]) -> None:
    path = write("p.yaml", "interval: -1\nengine: java\n")
    with pytest.raises(PolicyInvalidError) as info:
        build_policy(path, None, {})
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{path}:1:11: interval:")
    assert lines[1].startswith(f"{path}:2:9: engine:")
    assert "hpcckpt policy check" in info.value.render()
