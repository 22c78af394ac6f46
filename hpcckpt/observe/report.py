"""``hpcckpt report JOB``: one page on a job's checkpoints, as a PNG, an HTML page or a text summary.

The page has four plots over the run: the freeze and flush time of each
checkpoint; each image's size against the bytes actually written (the rest
came from the parent image); the interval in force against the measured
cost of a checkpoint (Daly's delta for ``interval: auto``); and a timeline of
attempts, restores and fallbacks. Restores are also marked on the first two
time plots, so a slow checkpoint after a restart can be told apart.

The HTML page embeds the PNG (base64) and a table of every data series, and
the same series as JSON (``<script id="series">``). matplotlib is an
optional extra (``pip install 'hpcckpt[report]'``); the text summary needs none.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Sequence
from typing import Any

from hpcckpt.errors import UsageError
from hpcckpt.humanize import human_size
from hpcckpt.observe.jobstats import Attempt, JobStats

_UNITS = ((120.0, 1.0, "s"), (2 * 3600.0, 60.0, "min"), (2 * 86400.0, 3600.0, "h"), (float("inf"), 86400.0, "d"))
_COLORS = {"freeze": "#1f77b4", "flush": "#ff7f0e", "total": "#7f7f7f", "image": "#9ecae1", "written": "#08519c",
           "interval": "#2ca02c", "cost": "#9467bd", "ok": "#2ca02c", "failed": "#d62728",
           "restore": "#1f77b4", "fallback": "#ff7f0e"}


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def ago(seconds: float) -> str:
    """'42 s ago', '3 min ago', '5 h ago', '2.5 d ago'."""
    for limit, scale, unit in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{seconds / scale:.0f} {unit} ago"
    return f"{seconds / 86400:.1f} d ago"


def series(job: JobStats) -> dict[str, Any]:
    """Every data series the page plots, as plain JSON-able data."""
    return {
        "job_id": job.job_id, "user": job.user, "start": job.first_seen,
        "attempts": [a.to_dict() for a in job.attempts],
        "restores": [{"ts": e["ts"], "ckptid": e.get("detail", ""), "node": e.get("node", "")}
                     for e in job.restores],
        "fallbacks": [{"ts": e["ts"], "detail": e.get("detail", ""), "node": e.get("node", "")}
                      for e in job.fallbacks],
    }


def summary_lines(job: JobStats, now: float | None = None) -> list[str]:
    t = time.time() if now is None else now
    done, failed = job.committed, job.failed
    last = job.last_success
    freezes = [a.frozen_s for a in done if a.frozen_s is not None]
    flushes = [a.flush_s for a in done if a.flush_s is not None]
    iv = job.interval
    cost = job.cost_s
    lines = [f"job {job.job_id} (user {job.user}): {len(done)} checkpoints committed, {len(failed)} failed"]
    if last is not None:
        at = last.finished or last.created
        lines.append(f"last good checkpoint: {last.ckptid} at {_when(at)} ({ago(t - at)})")
    else:
        lines.append("last good checkpoint: none")
    if freezes:
        lines.append(f"freeze: mean {sum(freezes) / len(freezes):.3f} s, max {max(freezes):.3f} s")
    if flushes:
        lines.append(f"flush: mean {sum(flushes) / len(flushes):.3f} s, max {max(flushes):.3f} s")
    lines.append(f"written: {human_size(job.total('written_bytes'))} of "
                 f"{human_size(job.total('image_bytes'))} in images; "
                 f"{human_size(job.total('saved_bytes'))} taken from parent images")
    if iv is not None:
        lines.append(f"interval: {iv[0]:.0f} s ({iv[1]})" + (f", measured cost {cost:.3f} s" if cost else ""))
    lines.append(f"restores: {len(job.restores)}, fallbacks: {len(job.fallbacks)}")
    if job.consecutive_failures:
        lines.append(f"the last {job.consecutive_failures} attempt(s) failed: "
                     f"{(failed[-1].error.splitlines() or [''])[0]}")
    return lines


def _unit(span: float) -> tuple[float, str]:
    for limit, scale, name in _UNITS:
        if span < limit:
            return scale, name
    return 86400.0, "d"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("plots need matplotlib, which is not installed",
                         hint="pip install 'hpcckpt[report]', or run without --output for a text summary") from exc
    return plt


def _mark_events(ax: Any, xs: Sequence[float], color: str, label: str | None, style: str = "-") -> None:
    for i, x in enumerate(xs):
        ax.axvline(x, color=color, linestyle=style, linewidth=1.6, alpha=0.8, label=label if i == 0 else None)


def render_png(job: JobStats) -> bytes:
    """The page as a PNG."""
    plt = _pyplot()
    t0 = job.first_seen
    ends = [a.finished or a.created for a in job.attempts] + [float(e["ts"]) for e in job.events]
    scale, unit = _unit(max([1.0, *(t - t0 for t in ends)]))

    def x(ts: float) -> float:
        return (ts - t0) / scale

    done: list[Attempt] = job.committed
    failed = job.failed
    restores = [x(float(e["ts"])) for e in job.restores]
    fallbacks = [x(float(e["ts"])) for e in job.fallbacks]
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), gridspec_kw={"height_ratios": [3, 3, 3, 1.4]})
    fig.suptitle(f"hpcckpt report: job {job.job_id} (user {job.user})", fontsize=15, fontweight="bold")
    fig.text(0.5, 0.945, "   ".join(summary_lines(job)[:2]), ha="center", fontsize=9.5, color="#333333")
    xlabel = f"time since the job's first checkpoint ({unit})"

    ax = axes[0]
    for key, vals in (("freeze", [(x(a.created), a.frozen_s) for a in done if a.frozen_s is not None]),
                      ("flush", [(x(a.created), a.flush_s) for a in done if a.flush_s is not None]),
                      ("total", [(x(a.created), a.total_s) for a in done if a.total_s is not None])):
        if vals:
            ax.plot([v[0] for v in vals], [v[1] for v in vals], marker="o", markersize=4, color=_COLORS[key],
                    linestyle="--" if key == "total" else "-", label=f"{key} (s)")
    if failed:
        ax.scatter([x(a.created) for a in failed], [0] * len(failed), marker="x", s=60, color=_COLORS["failed"],
                   label="failed attempt", zorder=5, clip_on=False)
    _mark_events(ax, restores, _COLORS["restore"], "restore", ":")
    ax.set_title("Freeze and flush time of each checkpoint", loc="left")
    ax.set_ylabel("seconds")
    ax.set_xlabel(xlabel)
    ax.set_ylim(bottom=0)

    ax = axes[1]
    by_id = [a for a in done if a.image_bytes is not None or a.written_bytes]
    if by_id:
        top = max(max(a.image_bytes or 0, a.written_bytes) for a in by_id)
        div, size_unit = 1.0, "B"
        for d, u in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if top >= d:
                div, size_unit = float(d), u
                break
        pos = list(range(len(by_id)))
        ax.bar([p - 0.2 for p in pos], [(a.image_bytes or 0) / div for a in by_id], width=0.4,
               color=_COLORS["image"], label="image size (before dedup and compression)")
        ax.bar([p + 0.2 for p in pos], [a.written_bytes / div for a in by_id], width=0.4, color=_COLORS["written"],
               label="bytes written")
        step = max(1, len(pos) // 25)
        ax.set_xticks(pos[::step], [str(a.ckptid) for a in by_id][::step])
        ax.set_ylabel(size_unit)
    ax.set_title("Image size and bytes actually written, per checkpoint", loc="left")
    ax.set_xlabel("checkpoint id")

    ax = axes[2]
    ivs = [(x(a.created), a.interval_s) for a in job.attempts if a.interval_s is not None]
    if ivs:
        origin = job.interval[1] if job.interval else ""
        ax.step([v[0] for v in ivs], [v[1] for v in ivs], where="post", color=_COLORS["interval"], linewidth=2,
                label=f"interval in force ({origin})")
    costs = [(x(a.created), a.cost_s if a.cost_s is not None else a.frozen_s) for a in done
             if (a.cost_s if a.cost_s is not None else a.frozen_s) is not None]
    if costs:
        ax.plot([c[0] for c in costs], [c[1] for c in costs], marker="s", markersize=4, color=_COLORS["cost"],
                label="measured cost (Daly's delta, else the freeze)")
    if ivs or costs:
        ax.set_yscale("log")
    _mark_events(ax, restores, _COLORS["restore"], "restore", ":")
    ax.set_title("Interval chosen against the measured cost of a checkpoint", loc="left")
    ax.set_ylabel("seconds (log)")
    ax.set_xlabel(xlabel)

    ax = axes[3]
    ax.scatter([x(a.created) for a in done], [1] * len(done), marker="o", color=_COLORS["ok"], label="committed")
    ax.scatter([x(a.created) for a in failed], [1] * len(failed), marker="x", s=70, color=_COLORS["failed"],
               label="failed")
    _mark_events(ax, restores, _COLORS["restore"], "restore (restart)")
    _mark_events(ax, fallbacks, _COLORS["fallback"], "fallback to an older image", "--")
    ax.set_yticks([])
    ax.set_ylim(0.5, 1.5)
    ax.set_title("Timeline: attempts, restarts and fallbacks", loc="left")
    ax.set_xlabel(xlabel)

    for ax in axes:
        ax.grid(True, alpha=0.3)
        handles, _labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


_COLUMNS = (("ckptid", "ckptid"), ("created", "taken at"), ("status", "status"), ("frozen_s", "freeze s"),
            ("flush_s", "flush s"), ("total_s", "total s"), ("image_bytes", "image bytes"),
            ("written_bytes", "written bytes"), ("saved_bytes", "from parent bytes"),
            ("interval_s", "interval s"), ("origin", "origin"), ("cost_s", "cost s"), ("node", "node"),
            ("error", "error"))


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "created":
        return _when(value)
    if key.endswith("_s"):
        return _secs(value)
    if key == "error":
        return (str(value).splitlines() or [""])[0][:200]
    return str(value)


def render_html(job: JobStats, png: bytes) -> str:
    e = html.escape
    data = series(job)
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{e(_cell(k, a[k]))}</td>" for k, _ in _COLUMNS) + "</tr>" for a in data["attempts"]
    )
    events = "\n".join(
        f"<tr><td>{e(kind)}</td><td>{e(_when(ev['ts']))}</td><td>{e(ev['node'])}</td>"
        f"<td>{e(str(ev.get('ckptid', ev.get('detail', ''))))}</td></tr>"
        for kind, evs in (("restore", data["restores"]), ("fallback", data["fallbacks"])) for ev in evs
    )
    head = "".join(f"<th>{e(title)}</th>" for _, title in _COLUMNS)
    summary = "".join(f"<li>{e(line)}</li>" for line in summary_lines(job))
    # Inside <script>, only "</" could end the element early: escape it.
    blob = json.dumps(data, default=str).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>hpcckpt report: job {e(job.job_id)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
th {{ background: #f0f0f0; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>hpcckpt report: job {e(job.job_id)} (user {e(job.user)})</h1>
<ul>{summary}</ul>
<img alt="checkpoint plots of job {e(job.job_id)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Checkpoint attempts</h2>
<table id="attempts"><thead><tr>{head}</tr></thead><tbody>
{rows}
</tbody></table>
<h2>Restores and fallbacks</h2>
<table id="events"><thead><tr><th>event</th><th>at</th><th>node</th><th>checkpoint / detail</th></tr></thead>
<tbody>
{events}
</tbody></table>
<script type="application/json" id="series">{blob}</script>
</body></html>
"""
