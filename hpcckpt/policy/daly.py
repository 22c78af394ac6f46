"""``interval: auto``: Daly's optimum checkpoint interval.

J. T. Daly, "A higher order estimate of the optimum checkpoint interval for
restart dumps", Future Generation Computer Systems 22 (2006) 303-312:
with δ the time to write one checkpoint and M the mean time between failures,

    τ_opt = sqrt(2δM) · [1 + (1/3)·sqrt(δ/(2M)) + (1/9)·(δ/(2M))] - δ    for δ < 2M
    τ_opt = M                                                             for δ ≥ 2M

The second branch is Daly's own: when a checkpoint costs two MTBFs or more,
the series no longer converges and checkpointing once per MTBF is the best
one can do. (The first-order estimate sqrt(2δM) - δ is
*not* used as the fallback: for δ ≥ 2M it is at most zero, or close to it.)
The paper's own checks, reproduced in tests/policy/test_daly.py: δ = 5 min
gives 117 min for M = 24 h, 57 min for M = 6 h, 9.1 min for M = 15 min.

δ is the median of the job's recent checkpoint costs (one slow checkpoint,
say on a busy file system, should not swing the interval); M is the site's
``site.mtbf``. The result is held within ``site.interval_min`` ..
``site.interval_max`` and any site ``bounds`` on ``interval``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from hpcckpt.errors import PolicyError
from hpcckpt.policy.model import Policy

FORMULA_SERIES = "daly2006:higher-order"
FORMULA_CAP = "daly2006:delta>=2M"


def daly_interval(delta: float, mtbf: float) -> float:
    """Daly's τ_opt in the same unit as ``delta`` and ``mtbf`` (both > 0)."""
    if not (delta > 0 and mtbf > 0 and math.isfinite(delta) and math.isfinite(mtbf)):
        raise PolicyError(f"Daly's interval needs a positive checkpoint cost and MTBF, got {delta} and {mtbf}")
    if delta >= 2 * mtbf:
        return float(mtbf)
    x = delta / (2 * mtbf)
    return math.sqrt(2 * delta * mtbf) * (1 + math.sqrt(x) / 3 + x / 9) - delta


def interval_limits(pol: Policy) -> tuple[int, int]:
    """The shortest and longest interval 'auto' may choose: site limits within any bounds."""
    lo, hi = pol.site.interval_min, pol.site.interval_max
    bound = pol.bounds.get("interval")
    if bound is not None:
        if bound.minimum is not None:
            lo = max(lo, int(bound.minimum))
        if bound.maximum is not None:
            hi = min(hi, int(bound.maximum))
    return lo, max(lo, hi)


def choose_interval(pol: Policy, recent_costs: Sequence[float]) -> tuple[int, dict[str, Any]]:
    """The interval to use now, in seconds, and the inputs that gave it (for logs and ``hpcckpt info``).

    A fixed ``interval`` is returned as is. For ``auto`` with no measured cost
    yet, the shortest allowed interval is used: the first checkpoint then
    comes early and measures the cost for the next choice.
    """
    if pol.interval != "auto":
        seconds = int(pol.interval)
        return seconds, {"mode": "fixed", "interval": seconds, "origin": pol.origins.get("interval", "")}
    mtbf = pol.site.mtbf
    if mtbf is None:
        raise PolicyError(
            "interval: 'auto' needs site.mtbf in the site policy",
            hint="ask your site to set site.mtbf, or give a fixed interval such as 1h",
        )
    lo, hi = interval_limits(pol)
    costs = [float(c) for c in recent_costs if math.isfinite(c) and c > 0]
    inputs: dict[str, Any] = {"mode": "auto", "mtbf": mtbf, "samples": len(costs), "min": lo, "max": hi}
    if not costs:
        inputs.update(formula="none:no-measured-cost", delta=None, raw=None, clamped=False, interval=lo)
        return lo, inputs
    delta = statistics.median(costs)
    raw = daly_interval(delta, float(mtbf))
    chosen = min(max(round(raw), lo), hi)
    inputs.update(
        formula=FORMULA_CAP if delta >= 2 * mtbf else FORMULA_SERIES,
        delta=delta,
        raw=raw,
        clamped=chosen != round(raw),
        interval=chosen,
    )
    return chosen, inputs
