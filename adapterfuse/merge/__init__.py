"""Merging experts' ΔW updates: pure tensor functions, one module per method, and a registry.

Use :func:`merge_deltas` with a name from :func:`available_methods`; the building blocks are in
:mod:`adapterfuse.merge.functional`.
"""

from __future__ import annotations

from adapterfuse.merge.common import MergeMethod, MergeParams, MergeResult
from adapterfuse.merge.functional import (
    dare_drop,
    disjoint_mean,
    elect_sign,
    stack_factors,
    trim_by_magnitude,
    truncate_dense,
    truncate_factors,
)
from adapterfuse.merge.registry import METHODS, available_methods, check_experts, get_method, merge_deltas

__all__ = [
    "METHODS",
    "MergeMethod",
    "MergeParams",
    "MergeResult",
    "available_methods",
    "check_experts",
    "dare_drop",
    "disjoint_mean",
    "elect_sign",
    "get_method",
    "merge_deltas",
    "stack_factors",
    "trim_by_magnitude",
    "truncate_dense",
    "truncate_factors",
]
