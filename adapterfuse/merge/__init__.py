"""Merging experts' ΔW updates: pure tensor functions, one module per method, and a registry.

Use :func:`merge` (experts in, a :class:`MergedAdapter` out: save, predict, push) or, on raw ΔW
factors, :func:`merge_deltas` with a name from :func:`available_methods`; the building blocks are in
:mod:`adapterfuse.merge.functional`.
"""

from __future__ import annotations

from adapterfuse.merge.adapter import MergedAdapter
from adapterfuse.merge.api import SEARCH_METHODS, MergeCombiner, all_methods, merge, prepare
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
from adapterfuse.merge.soup import greedy_soup

__all__ = [
    "METHODS",
    "SEARCH_METHODS",
    "MergeCombiner",
    "MergeMethod",
    "MergeParams",
    "MergeResult",
    "MergedAdapter",
    "all_methods",
    "available_methods",
    "check_experts",
    "dare_drop",
    "disjoint_mean",
    "elect_sign",
    "get_method",
    "greedy_soup",
    "merge",
    "merge_deltas",
    "prepare",
    "stack_factors",
    "trim_by_magnitude",
    "truncate_dense",
    "truncate_factors",
]

from adapterfuse._callable import make_callable

make_callable(__name__, merge)  # adapterfuse.merge(experts, method=...) is the API of DESIGN.md
