"""The routing backend: send each input to its top-k experts, then pool them or merge them; or Arrow.

- :func:`route` builds a routed predictor from experts (learned, clustered, MBC or Arrow routing);
- :class:`RoutePredictor` / :class:`ArrowPredictor` answer, cost, save, and load again
  (``RoutePredictor.load(folder, base)`` loads either);
- :class:`RoutingData` caches the validation features and the experts' answers across many calls;
- :func:`routing_accuracy`, :func:`greedy_subset` and :func:`quality_curve` give the reports;
- :class:`UtilityRouter` turns a task posterior into the expert of highest expected score.
"""

from __future__ import annotations

from adapterfuse.route.api import ROUTERS, RouteCombiner, accuracy_report, quality_curve, route, routing_accuracy
from adapterfuse.route.arrow import ArrowLinear, ArrowModel, arrow_prototypes, power_prototypes, routing_weights
from adapterfuse.route.cluster import ClusterRouter
from adapterfuse.route.data import PoolScores, RoutingData, routed_score
from adapterfuse.route.features import FeatureExtractor, routing_texts
from adapterfuse.route.learned import LearnedRouter
from adapterfuse.route.mbc import cluster_experts, cosine_matrix, mbc_pool
from adapterfuse.route.predictor import ArrowPredictor, RoutePredictor
from adapterfuse.route.routers import FixedRouter, Router, keep_top_k
from adapterfuse.route.subset import Subset, greedy_subset
from adapterfuse.route.utility import UtilityRouter, expected_scores, utility_matrix

__all__ = [
    "ROUTERS",
    "ArrowLinear",
    "ArrowModel",
    "ArrowPredictor",
    "ClusterRouter",
    "FeatureExtractor",
    "FixedRouter",
    "LearnedRouter",
    "PoolScores",
    "RouteCombiner",
    "RoutePredictor",
    "Router",
    "RoutingData",
    "Subset",
    "UtilityRouter",
    "accuracy_report",
    "arrow_prototypes",
    "cluster_experts",
    "cosine_matrix",
    "expected_scores",
    "greedy_subset",
    "keep_top_k",
    "mbc_pool",
    "power_prototypes",
    "quality_curve",
    "route",
    "routed_score",
    "routing_accuracy",
    "routing_texts",
    "routing_weights",
    "utility_matrix",
]

from adapterfuse._callable import make_callable

make_callable(__name__, route)  # adapterfuse.route(experts, base, router=...) is the API of DESIGN.md
