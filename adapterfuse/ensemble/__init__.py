"""The ensemble backend: K experts in one batched pass, pooled linearly or log-linearly.

Weights are uniform, given, or learned on the validation split (negative allowed for log-linear
pooling); members can be chosen by greedy forward selection or by their single validation scores; an
ensemble can be distilled into one adapter.
"""

from __future__ import annotations

from adapterfuse.ensemble.batched import BatchedEnsemble, StackedLoRALinear, stack_factors
from adapterfuse.ensemble.cache import MemberCache, cache_members, pooled_nll, pooled_score
from adapterfuse.ensemble.distill import distill
from adapterfuse.ensemble.fit import EnsembleCombiner, ensemble
from adapterfuse.ensemble.pooling import POOLINGS, linear, log_linear, pool, pooled_log_probs
from adapterfuse.ensemble.predictor import EnsemblePredictor
from adapterfuse.ensemble.select import Selection, greedy, top_k
from adapterfuse.ensemble.weights import WeightFit, learn_weights, resolve_weights

__all__ = [
    "POOLINGS",
    "BatchedEnsemble",
    "EnsembleCombiner",
    "EnsemblePredictor",
    "MemberCache",
    "Selection",
    "StackedLoRALinear",
    "WeightFit",
    "cache_members",
    "distill",
    "ensemble",
    "greedy",
    "learn_weights",
    "linear",
    "log_linear",
    "pool",
    "pooled_log_probs",
    "pooled_nll",
    "pooled_score",
    "resolve_weights",
    "stack_factors",
    "top_k",
]

from adapterfuse._callable import make_callable

make_callable(__name__, ensemble)  # adapterfuse.ensemble(experts, base, pooling=...) is the API of DESIGN.md
