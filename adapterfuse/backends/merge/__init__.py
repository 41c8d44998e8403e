"""Merging experts' ΔW updates: pure tensor functions, one module per method, and a registry.

Use :func:`merge` (experts in, a :class:`MergedAdapter` out: save, predict, push) or, on raw ΔW
factors, :func:`merge_deltas` with a name from :func:`available_methods`; the building blocks are in
:mod:`adapterfuse.backends.merge.functional`.
"""
