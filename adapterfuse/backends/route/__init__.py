"""The routing backend: send each input to its top-k experts, then pool them or merge them; or Arrow.

- :func:`route` builds a routed predictor from experts (learned, clustered, MBC or Arrow routing);
- :class:`RoutePredictor` / :class:`ArrowPredictor` answer, cost, save, and load again
  (``RoutePredictor.load(folder, base)`` loads either);
- :class:`RoutingData` caches the validation features and the experts' answers across many calls;
- :func:`routing_accuracy`, :func:`greedy_subset` and :func:`quality_curve` give the reports;
- :class:`UtilityRouter` turns a task posterior into the expert of highest expected score.
"""
