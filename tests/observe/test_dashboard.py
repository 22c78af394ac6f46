"""The Grafana dashboard and the documented alerts name only metrics that hpcckpt emits."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hpcckpt.observe.jobstats import Attempt, JobStats
from hpcckpt.observe.metrics import StagingUse, render

REPO = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bhpcckpt_[a-z_]+\b")


def emitted() -> set[str]:
    a = Attempt(1, 1.0, "committed", True, 2.0, 0.1, 0.2, 0.3, 10, 20, 5, 60.0, "fixed", None, 0, "n", "")
    text = render([JobStats("1", "u", 0, [a], [])], {("u", "1"): StagingUse(1, 0)})
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("hpcckpt_")}


def test_dashboard_queries_use_emitted_metrics() -> None:
    doc = json.loads((REPO / "plugins/grafana/hpcckpt.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert exprs and len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    used = {n for e in exprs for n in NAME.findall(e)}
    assert used <= emitted(), used - emitted()


def test_documented_alerts_use_emitted_metrics() -> None:
    text = (REPO / "docs/monitoring.md").read_text()
    alerts = text.split("### Alerts", 1)[1].split("### Grafana", 1)[0]
    used = set(NAME.findall(alerts))
    assert used and used <= emitted(), used - emitted()
