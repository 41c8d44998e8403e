"""Training: one expert per task, distillation, and parameter-efficient ensembles."""
