"""The training configuration of an expert, validated before any model is loaded."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapterfuse.backends.options import MAX_SEED

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainConfig(BaseModel):
    """How one expert is trained. Unknown keys and out-of-range values are refused.

    The defaults are what the GLUE experts in ``docs/results.md`` were trained with, except where a
    recipe says otherwise (caps and epochs per task).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: Literal["lora", "adalora"] = "lora"
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank; AdaLoRA's average target rank")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2 x rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ALL_LINEAR
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0, le=100)
    batch_size: int = Field(16, ge=1)
    max_train_examples: int | None = Field(2000, ge=1)
    validation_size: int = Field(200, ge=0)
    max_length: int = Field(256, ge=8)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    autocast: bool = True
    balance_classes: bool = Field(False, description="weight the loss by inverse class frequency")
    bootstrap: bool = Field(
        False,
        description="train on a bootstrap resample of the training examples (drawn with replacement, "
        "seeded by seed): members of different seeds form a bagged ensemble",
    )
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    snapshots: int = Field(
        1,
        ge=1,
        le=64,
        description="save this many adapters along one run, each at the end of "
        "a cosine learning-rate cycle (snapshot ensembles); 1: one expert, linear schedule",
    )
    average_last: int = Field(
        1,
        ge=1,
        le=64,
        description="save the exact mean of the adapter's ΔW at the last N checkpoints (checkpoint_every "
        "steps apart), written as one LoRA of rank N x rank; 1: the final adapter",
    )
    eval_batch_size: int = Field(32, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    adalora_init_r: int = Field(12, ge=1, description="AdaLoRA's initial rank per module")
    adalora_tinit_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps before pruning starts")
    adalora_tfinal_ratio: float = Field(0.2, ge=0, lt=1, description="share of steps after the budget is fixed")
    adalora_delta_t: int = Field(10, ge=1, description="steps between rank reallocations")
    adalora_orth_reg: float = Field(0.5, ge=0, description="orthogonality regulariser weight")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.method == "adalora":
            if self.rank > self.adalora_init_r:
                raise ValueError(
                    f"rank {self.rank} > adalora_init_r {self.adalora_init_r}; AdaLoRA prunes "
                    "from init_r down to rank, so init_r must be at least rank"
                )
            if self.adalora_tinit_ratio + self.adalora_tfinal_ratio >= 1:
                raise ValueError("adalora_tinit_ratio + adalora_tfinal_ratio must be < 1 to leave steps for pruning")
        if self.snapshots > 1 and self.method == "adalora":
            raise ValueError("snapshots > 1 needs method 'lora': AdaLoRA's rank budget follows one schedule")
        if self.average_last > 1 and (self.method != "lora" or self.snapshots > 1):
            raise ValueError("average_last > 1 needs method 'lora' and snapshots 1 (one run, one averaged adapter)")
        if not self.target_modules:
            raise ValueError("target_modules: expected at least one module name")
        return self

    @property
    def lora_alpha(self) -> float:
        """The alpha actually used."""
        return self.alpha if self.alpha is not None else 2.0 * self.rank


def stable_adapter_config(config: dict[str, Any]) -> dict[str, Any]:
    """A PEFT adapter config with its module list sorted, so that one training run writes the same bytes
    in every process (PEFT keeps ``target_modules`` as a set and writes it in the set's order, which
    depends on the process's hash seed).

    Args:
        config: the ``adapter_config.json`` content.

    Returns:
        The same config, ``target_modules`` sorted when it is a list.
    """
    modules = config.get("target_modules")
    return {**config, "target_modules": sorted(modules)} if isinstance(modules, list) else config
