"""Policy: how often to checkpoint, where images go, what to keep, what to do on
preemption and failure, from layered YAML files (docs/policy.md).

    from hpcckpt.policy import load_policy
    pol = load_policy(cli={"interval": "10m"})
    pol.interval, pol.origin("interval")   # 600, "cli:--interval"
"""

from __future__ import annotations

from hpcckpt.policy.diagnostics import Diagnostic, Loc, PolicyInvalidError
from hpcckpt.policy.layers import parse_set_options
from hpcckpt.policy.loader import build_policy, load_policy, site_policy_path, user_policy_path
from hpcckpt.policy.model import (
    Bound,
    CompressionPolicy,
    CriuPolicy,
    FailurePolicy,
    LoggingPolicy,
    MetricsPolicy,
    MpiPolicy,
    PipelinePolicy,
    Policy,
    PreemptionPolicy,
    RestorePolicy,
    RetentionPolicy,
    SitePolicy,
    SlurmPolicy,
    StoragePolicy,
)

__all__ = [
    "Bound",
    "CompressionPolicy",
    "CriuPolicy",
    "Diagnostic",
    "FailurePolicy",
    "Loc",
    "LoggingPolicy",
    "MetricsPolicy",
    "MpiPolicy",
    "PipelinePolicy",
    "Policy",
    "PolicyInvalidError",
    "PreemptionPolicy",
    "RestorePolicy",
    "RetentionPolicy",
    "SitePolicy",
    "SlurmPolicy",
    "StoragePolicy",
    "build_policy",
    "load_policy",
    "parse_set_options",
    "site_policy_path",
    "user_policy_path",
]
