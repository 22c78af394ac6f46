"""Human-readable text for an image summary (``hpcckpt info``), like the patchset's ckptinfo."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator

from hpcckpt.humanize import human_size
from hpcckpt.image.model import ImageSummary, TaskInfo


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)) if t else "-"


def _tree(tasks: list[TaskInfo]) -> Iterator[tuple[int, TaskInfo]]:
    """(depth, task) in tree order; tasks whose parent is not in the image are roots."""
    pids = {t.pid for t in tasks}
    children: dict[int, list[TaskInfo]] = {}
    roots = []
    for t in tasks:
        if t.ppid in pids and t.ppid != t.pid:
            children.setdefault(t.ppid, []).append(t)
        else:
            roots.append(t)
    seen: set[int] = set()
    stack = [(0, t) for t in reversed(roots)]
    while stack:
        depth, t = stack.pop()
        if t.pid in seen:  # a cycle in hostile metadata must not loop forever
            continue
        seen.add(t.pid)
        yield depth, t
        stack.extend((depth + 1, c) for c in reversed(children.get(t.pid, [])))


def render_summary(path: str, s: ImageSummary) -> str:
    m, h = s.meta, s.header
    out = [
        f"image       {path}",
        f"format      {h.get('format_version')}  {human_size(s.length)} in {s.records} records  "
        f"digest {s.digest}",
        f"status      {'FAILED checkpoint' if s.errors else 'ok'}",
        f"checkpoint  {m.ckptid}  job {m.job_id}"
        + (f" step {m.step}" if m.step else "")
        + (f" array {m.array_job_id}_{m.array_task_id}" if m.array_job_id else "")
        + (f"  parent {m.parent_ckptid}" if m.parent_ckptid is not None else "")
        + f"  requeues {m.requeue_count}",
        f"engine      {m.engine} {m.engine_version}".rstrip(),
        f"taken       {_when(m.created)} on {m.node or h.get('hostname')} (hostname {h.get('hostname')})",
        f"system      {h.get('arch')}  kernel {h.get('kernel_release')} {h.get('kernel_version')}",
        f"user        {m.user or '-'} (uid {m.uid}, gid {m.gid})",
        f"command     {' '.join(m.cmdline) or '-'}",
        f"cwd         {m.cwd or '-'}",
        f"policy      {m.policy_digest or '-'}",
    ]
    iv = m.extra.get("interval")
    if isinstance(iv, dict) and iv.get("seconds") is not None:
        line = f"interval    {iv['seconds']} s ({iv.get('mode', '?')}"
        if iv.get("mode") == "auto":
            line += (f": {iv.get('formula')}, mtbf {iv.get('mtbf')} s, checkpoint cost {iv.get('delta')} s "
                     f"over {iv.get('samples')} samples, bounds {iv.get('min')}..{iv.get('max')} s")
        out.append(line + ")")
    if s.parents:
        out.insert(4, f"chain       incremental on {', '.join(map(str, s.parents))}: {human_size(s.ref_bytes)} "
                   f"taken from them, {'verified with them' if s.parents_verified else 'parents NOT verified'}")
    if s.errors:
        out.append("")
        out.append("errors:")
        out.extend("  " + e.replace("\n", "\n  ") for e in s.errors)
    if s.tasks:
        out.append("")
        out.append(f"processes ({len(s.tasks)}):")
        out.append(f"  {'PID':>7} {'PPID':>7} {'PGID':>7} {'SID':>7}  COMM / CMDLINE")
        for depth, t in _tree(s.tasks):
            cmd = " ".join(t.cmdline)
            out.append(f"  {t.pid:>7} {t.ppid:>7} {t.pgid:>7} {t.sid:>7}  {'  ' * depth}{t.comm}  {cmd}".rstrip())
    if s.files:
        out.append("")
        out.append(f"open files ({len(s.files)}):")
        for f in s.files:
            out.append(f"  pid {f.pid} fd {f.fd} {f.mode:<2} {human_size(f.size):>10}  {f.path}")
    if s.sections:
        total = sum(x.size for x in s.sections)
        stored = sum(x.stored for x in s.sections)
        out.append("")
        out.append(f"sections ({len(s.sections)}, {human_size(total)} stored as {human_size(stored)}):")
        out.append(f"  {'MODE':<10} {'SIZE':>10} {'STORED':>10} {'RATIO':>6} {'CODEC':<5} NAME")
        for x in s.sections:
            out.append(
                f"  {stat.filemode(x.mode):<10} {human_size(x.size):>10} {human_size(x.stored):>10} "
                f"{x.ratio:>6.2f} {x.codec:<5} {x.name}{'/' if x.kind == 'dir' else ''}"
            )
    return "\n".join(out) + "\n"
