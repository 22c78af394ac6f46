"""The fast storage pipeline: node-local staging, background flush, incremental chains.

A checkpoint is dumped into node-local staging (tmpfs when the node has the
memory for it, local disk otherwise), the job is thawed at once, and one
background worker packs the dump into the store: compressed, deduplicated
against the previous image, published atomically. See docs/performance.md.
"""

from __future__ import annotations

from hpcckpt.core.pipeline.chain import ChainDecision, decide_chain
from hpcckpt.core.pipeline.flush import (
    Admission,
    Flusher,
    FlushResult,
    FlushSettings,
    SalvageReport,
    StorePublisher,
    salvage_staging,
)
from hpcckpt.core.pipeline.staging import StagedCheckpoint, StagingChoice, choose_staging, staging_candidates

__all__ = [
    "Admission",
    "ChainDecision",
    "FlushResult",
    "FlushSettings",
    "Flusher",
    "SalvageReport",
    "StagedCheckpoint",
    "StagingChoice",
    "StorePublisher",
    "choose_staging",
    "decide_chain",
    "salvage_staging",
    "staging_candidates",
]
