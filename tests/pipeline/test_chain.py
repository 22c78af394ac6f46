"""Chain bounding: a full image every full_every checkpoints or past the size ratio."""

from __future__ import annotations

from hpcckpt.core.pipeline.chain import decide_chain
from hpcckpt.image.refs import ParentIndex


def idx(depth: int, chain_bytes: int = 100, base_bytes: int = 100) -> ParentIndex:
    return ParentIndex(ckptid=10 + depth, depth=depth, base=10, base_bytes=base_bytes, chain_bytes=chain_bytes)


def test_no_parent_or_incremental_off_means_full() -> None:
    assert decide_chain(None, incremental=True, full_every=8, max_chain_ratio=2.0).parent is None
    d = decide_chain(idx(0), incremental=False, full_every=8, max_chain_ratio=2.0)
    assert d.parent is None and "incremental is off" in d.reason


def test_full_every_counts_incremental_images() -> None:
    # full_every=3: full, inc, inc, inc, then full again
    for depth, full in [(0, False), (1, False), (2, False), (3, True)]:
        d = decide_chain(idx(depth), incremental=True, full_every=3, max_chain_ratio=100.0)
        assert (d.parent is None) is full, (depth, d.reason)


def test_chain_ratio_forces_a_full_image() -> None:
    assert decide_chain(idx(1, 190, 100), incremental=True, full_every=8, max_chain_ratio=2.0).parent is not None
    d = decide_chain(idx(1, 210, 100), incremental=True, full_every=8, max_chain_ratio=2.0)
    assert d.parent is None and "max_chain_ratio" in d.reason
