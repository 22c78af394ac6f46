"""Full or incremental: bounding a chain of incremental images, and keeping a fallback outside it.

A long chain makes restore read many files and keeps every image of the chain
alive under retention, so a full image is taken every ``pipeline.full_every``
checkpoints, or as soon as the chain's bytes exceed ``max_chain_ratio`` times
its full image (memory that changes a lot makes each link nearly full-size,
and the chain then costs more than starting over).

Every image of a chain needs its base: one damaged byte there makes the whole
chain unrestorable. So with ``retention.fallback_full`` (the default) an image
is written incremental only when the job has another committed full image, one
outside the parent's chain, that retention keeps as its fallback
(:func:`hpcckpt.store.retention.fallback_full`). A job's first two images are
therefore full, and from then on the newest image and the fallback never share
an image: whichever single image is damaged, one of them restores.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcckpt.image.refs import ParentIndex


@dataclass(frozen=True)
class ChainDecision:
    parent: ParentIndex | None  # None: write a full image
    reason: str


def decide_chain(
    parent: ParentIndex | None, *, incremental: bool, full_every: int, max_chain_ratio: float,
    fallback: bool = True,
) -> ChainDecision:
    """Whether the next image may refer to ``parent`` (the last published image's index).

    ``fallback``: whether ``parent``'s chain is still all committed (none found corrupt) and the job
    has a committed full image outside it (always true when ``retention.fallback_full`` is off).
    """
    if not incremental:
        return ChainDecision(None, "pipeline.incremental is off")
    if parent is None:
        return ChainDecision(None, "no parent image")
    if parent.depth + 1 > full_every:
        return ChainDecision(None, f"chain reached pipeline.full_every={full_every} incremental images")
    if parent.base_bytes and parent.chain_bytes > max_chain_ratio * parent.base_bytes:
        return ChainDecision(
            None, f"chain holds {parent.chain_bytes} bytes, over pipeline.max_chain_ratio={max_chain_ratio} "
            f"times its full image ({parent.base_bytes} bytes)",
        )
    if not fallback:
        return ChainDecision(
            None, f"the chain of checkpoint {parent.ckptid} has no full image outside it to fall back on, or "
            "an image of it is no longer committed (retention.fallback_full)",
        )
    return ChainDecision(parent, f"incremental on checkpoint {parent.ckptid} (depth {parent.depth + 1})")
