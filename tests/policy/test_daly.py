"""interval: auto against Daly (2006) and the paper's own worked examples."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcckpt.errors import PolicyError
from hpcckpt.policy import build_policy
from hpcckpt.policy.daly import FORMULA_CAP, FORMULA_SERIES, choose_interval, daly_interval

Write = Callable[[str, str], Path]


def formula(delta: float, m: float) -> float:
    """Daly 2006, written out independently of the module under test."""
    if delta >= 2 * m:
        return m
    return math.sqrt(2 * delta * m) * (1 + (1 / 3) * math.sqrt(delta / (2 * m)) + (1 / 9) * (delta / (2 * m))) - delta


@pytest.mark.parametrize(
    ("mtbf_min", "expected_min"),
    [(24 * 60, 117), (6 * 60, 57), (15, 9.1)],  # Daly's figures 3-5: delta = 5 min
)
def test_papers_examples(mtbf_min: float, expected_min: float) -> None:
    assert daly_interval(5 * 60, mtbf_min * 60) / 60 == pytest.approx(expected_min, abs=0.5 if expected_min > 10
                                                                        else 0.05)


def test_cap_when_checkpoint_costs_two_mtbf() -> None:
    assert daly_interval(7200, 3600) == 3600
    assert daly_interval(10_000, 3600) == 3600
    # Just below the cap the series applies, and stays positive.
    assert daly_interval(7199, 3600) == pytest.approx(formula(7199, 3600))
    assert daly_interval(7199, 3600) > 0


@given(st.floats(0.01, 1e6), st.floats(1.0, 1e8))
def test_matches_formula(delta: float, mtbf: float) -> None:
    assert daly_interval(delta, mtbf) == pytest.approx(formula(delta, mtbf), rel=1e-12)


def test_rejects_nonsense() -> None:
    with pytest.raises(PolicyError):
        daly_interval(0, 3600)
    with pytest.raises(PolicyError):
        daly_interval(10, float("inf"))


def _auto(write: Write, site_extra: str = "") -> object:
    site = write("site.yaml", f"site: {{mtbf: 24h, interval_min: 10m, interval_max: 12h}}\n{site_extra}")
    return build_policy(write("user.yaml", "interval: auto\n"), site, {})


def test_choose_interval_auto(write: Write) -> None:
    pol = _auto(write)
    seconds, inputs = choose_interval(pol, [290.0, 300.0, 900.0])  # type: ignore[arg-type]
    assert inputs["delta"] == 300.0  # the median: one slow checkpoint does not swing it
    assert inputs["mtbf"] == 86400 and inputs["samples"] == 3
    assert inputs["formula"] == FORMULA_SERIES
    assert inputs["raw"] == pytest.approx(formula(300, 86400))
    assert seconds == round(formula(300, 86400)) == inputs["interval"]
    assert inputs["clamped"] is False


def test_choose_interval_clamps(write: Write) -> None:
    pol = _auto(write)
    seconds, inputs = choose_interval(pol, [0.5])  # type: ignore[arg-type]
    assert round(formula(0.5, 86400)) < 600 and seconds == 600 and inputs["clamped"] is True
    seconds, inputs = choose_interval(pol, [200_000.0])  # type: ignore[arg-type]
    assert inputs["formula"] == FORMULA_CAP and inputs["raw"] == 86400
    assert seconds == 12 * 3600 and inputs["clamped"] is True


def test_choose_interval_respects_bounds(write: Write) -> None:
    pol = _auto(write, "bounds:\n  interval: {min: 2h}\n")
    seconds, inputs = choose_interval(pol, [60.0])  # type: ignore[arg-type]
    assert round(formula(60, 86400)) < 7200
    assert seconds == 7200 and inputs["min"] == 7200


def test_choose_interval_without_measurements(write: Write) -> None:
    seconds, inputs = choose_interval(_auto(write), [])  # type: ignore[arg-type]
    assert seconds == 600 and inputs["delta"] is None and inputs["samples"] == 0


def test_fixed_interval_passes_through() -> None:
    seconds, inputs = choose_interval(build_policy(None, None, {"interval": "10m"}), [30.0])
    assert seconds == 600 and inputs == {"mode": "fixed", "interval": 600, "origin": "cli:--interval"}
