"""The ensemble backend: K experts in one batched pass, pooled linearly or log-linearly.

Weights are uniform, given, or learned on the validation split (negative allowed for log-linear
pooling); members can be chosen by greedy forward selection or by their single validation scores; an
ensemble can be distilled into one adapter.
"""
