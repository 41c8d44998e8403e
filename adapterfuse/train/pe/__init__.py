"""Parameter-efficient ensembles: K members that share most of their adapter weights.

``train_pe_ensemble(base, task, PESpec(kind, members=K, config=...), out=...)`` trains one of

- ``batchensemble``: BatchEnsemble / TabM LoRA (shared A, B; per-member rank-1 r_k, s_k);
- ``mimo``: K inputs packed in one sequence through one shared LoRA, K answers;
- ``camero``: shared bottom-layer LoRA, per-member top-layer LoRA, perturbations, consistency loss;
- ``swag``: a Gaussian over one LoRA fitted along the end of training, K samples;

and saves a folder that :func:`load_pe_ensemble` turns into a harness predictor (members pooled as
in the ensemble backend) or :meth:`PEEnsemble.merged` into one plain LoRA adapter.
"""
