"""The options of parameter-efficient ensemble training, validated before any model or data is read.

Every kind-specific option carries its kind's prefix (``be_``, ``mimo_``, ``camero_``, ``swag_``), so an
option given to the wrong kind is refused instead of silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapterfuse.backends.ensemble.pooling import POOLINGS
from adapterfuse.backends.options import MAX_SEED
from adapterfuse.errors import ConfigError
from adapterfuse.train.config import TrainConfig

KINDS = ("batchensemble", "mimo", "camero", "swag")
MAX_MEMBERS = 64
"""The most members a parameter-efficient ensemble may have (each one is a copy of the adapter's state)."""
_PREFIX = {"batchensemble": "be_", "mimo": "mimo_", "camero": "camero_", "swag": "swag_"}


class PEOptions(BaseModel):
    """How a parameter-efficient ensemble is trained and pooled. Unknown keys are refused.

    Attributes:
        pooling: how the members' distributions are pooled (as in the ensemble backend).
        be_data: ``all``: every example is seen by every member in one pass (TabM); ``split``: each
            step's batch is cut into K parts, one per member (BatchEnsemble's original recipe).
        be_jitter: r and s start at ``1 ± be_jitter`` with seeded random signs, so members differ.
        mimo_separator: the text between the K packed inputs.
        mimo_repeat: the share of training rows whose K slots all hold the same example (MIMO's input
            repetition; 0: every slot an independent example).
        camero_shared_layers: decoder layers (from the bottom) whose adapter all members share;
            default: half of the layers.
        camero_perturbation: ``dropout`` or ``noise`` on the hidden states entering the first
            per-member layer (a different draw per member row), or ``none``.
        camero_perturbation_scale: the dropout probability, or the noise's standard deviation relative
            to the hidden states' RMS.
        camero_consistency: weight of the consistency loss (mean KL from the members' mean to each member).
        swag_start: the share of training after which the adapter is snapshotted.
        swag_every: steps between snapshots.
        swag_rank: the number of deviation columns kept (the low-rank part of the covariance).
        swag_scale: the scale of the sampled deviations (0 samples the mean).
        swag_lr_ratio: the learning rate is held at this share of ``lr`` while snapshots are taken.
        sample_seed: the seed of the SWAG samples (default: the training seed).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    pooling: Literal["linear", "log_linear"] = "linear"
    be_data: Literal["all", "split"] = "all"
    be_jitter: float = Field(0.1, ge=0, le=1)
    mimo_separator: str = "\n\n"
    mimo_repeat: float = Field(0.0, ge=0, le=1)
    camero_shared_layers: int | None = Field(None, ge=0)
    camero_perturbation: Literal["dropout", "noise", "none"] = "none"
    camero_perturbation_scale: float = Field(0.1, ge=0, lt=1)
    camero_consistency: float = Field(1.0, ge=0)
    swag_start: float = Field(0.5, ge=0, lt=1)
    swag_every: int = Field(1, ge=1)
    swag_rank: int = Field(10, ge=0)
    swag_scale: float = Field(0.5, ge=0)
    swag_lr_ratio: float = Field(0.5, gt=0, le=1)
    sample_seed: int | None = Field(None, ge=0, le=MAX_SEED)


@dataclass(frozen=True)
class PESpec:
    """What parameter-efficient ensemble to train: the kind, K, the training settings and the kind's options.

    Nothing is checked here; :func:`parse_options` checks it all before any model or data is read.

    Attributes:
        kind: one of :data:`KINDS`.
        members: K (members, MIMO slots, or SWAG samples), 1 .. :data:`MAX_MEMBERS`.
        config: training settings (seed, lr, epochs, batch size, rank, autocast …); ``method`` must be lora;
            ``None``: the defaults of :class:`~adapterfuse.train.config.TrainConfig`.
        options: the fields of :class:`PEOptions` to set (the kind's prefixed options, ``pooling``,
            ``sample_seed``); ``None``: the defaults.
    """

    kind: str = "batchensemble"
    members: int = 4
    config: TrainConfig | None = None
    options: Mapping[str, Any] | None = None


def check_kind(kind: str, members: int) -> str:
    """Return ``kind`` if it is known and ``members`` is valid.

    Raises:
        ConfigError: an unknown kind (listing the known ones), or members not an int in 1 .. MAX_MEMBERS.
    """
    if kind not in KINDS:
        raise ConfigError(f"ensemble kind {kind!r}: unknown; expected one of {', '.join(KINDS)}")
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ConfigError(f"members: expected an integer >= 1, got {members!r}")
    if members > MAX_MEMBERS:
        raise ConfigError(
            f"members: expected an integer <= {MAX_MEMBERS}, got {members}; each member is one more copy of the adapter"
        )
    return kind


def parse_options(kind: str, members: int, config: TrainConfig, options: dict[str, Any]) -> PEOptions:
    """Validate the options for a kind (and their fit with the training config).

    Args:
        kind: one of :data:`KINDS`.
        members: K.
        config: the training configuration.
        options: keyword options (see :class:`PEOptions`).

    Returns:
        The validated options.

    Raises:
        ConfigError: unknown kind or option, an option of another kind, a bad value, AdaLoRA, or a
            split batch too small to give every member a row.
    """
    check_kind(kind, members)
    foreign = sorted(
        k for k in options if any(k.startswith(p) for p in _PREFIX.values()) and not k.startswith(_PREFIX[kind])
    )
    if foreign:
        raise ConfigError(
            f"options {foreign}: belong to another kind than {kind!r} (its options start with {_PREFIX[kind]!r})"
        )
    try:
        opts = PEOptions(**options)
    except ValidationError as e:
        raise ConfigError(
            f"ensemble options: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}; expected one of "
            f"{sorted(PEOptions.model_fields)} with a valid value"
        ) from None
    if config.method != "lora":
        raise ConfigError(
            f"method {config.method!r}: parameter-efficient ensembles train LoRA factors; expected method='lora'"
        )
    if kind == "batchensemble" and opts.be_data == "split" and config.batch_size < members:
        raise ConfigError(
            f"batch_size {config.batch_size} < members {members}: be_data='split' gives each "
            "member a share of the batch; expected batch_size >= members"
        )
    if opts.pooling not in POOLINGS:  # pragma: no cover - the Literal already enforces it
        raise ConfigError(f"pooling {opts.pooling!r}: unknown")
    return opts
