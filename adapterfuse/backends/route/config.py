"""Every option of the routing backend, declared once: :class:`RouteConfig`.

The options of each router kind live in their own model (:class:`LearnedOptions`,
:class:`ClusteredOptions`, :class:`MBCOptions`, :class:`ArrowOptions`); :class:`RouteConfig` adds the
shared ones. Its validators check everything that needs no expert; :func:`check_route` adds the checks
that need the number of experts (``top_k``, ``mbc_clusters``) and whether validation data is there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapterfuse.backends.options import MAX_SEED
from adapterfuse.backends.route.features import DEFAULT_LAYER, SHAPE_DIMS
from adapterfuse.errors import ConfigError
from adapterfuse.head import DEFAULT_MAX_LENGTH

Router = Literal["learned", "clustered", "mbc", "arrow"]
Target = Literal["task", "best_expert", "likelihood", "task_prior"]


class _Options(BaseModel):
    # Frozen so a fitted predictor's recorded settings cannot drift; extra="forbid" so a misspelt option is an
    # error instead of a silently ignored key; no NaN/inf in any number.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class LearnedOptions(_Options):
    """Options of the learned router (also MBC's, when it routes across groups with it).

    Attributes:
        hidden: hidden size of the classifier (0: linear).
        epochs: full-batch training steps.
        lr: Adam's learning rate.
        target: what it learns: the input's ``"task"`` (its own task's expert); ``"best_expert"`` (the expert
            with the highest likelihood of the gold label); ``"likelihood"`` (maximise
            the routed mixture's validation likelihood); ``"task_prior"`` (that likelihood plus a prior
            towards the input's own task's expert).
        prior_weight: the weight of ``"task_prior"``'s prior; ``None`` chooses it by ``cv_folds``-fold
            cross-validation on the validation split.
        cv_folds: the folds of that cross-validation.
        pca: project the features onto this many principal components of the validation features first
            (the text's shape, when appended, passes through); ``None``: no projection.
        decision: ``"probability"`` keeps each input's most probable experts; ``"utility"`` (target
            ``"task"``) those of highest expected validation score under the router's task posterior.
    """

    hidden: int = Field(0, ge=0, strict=True)
    epochs: int = Field(300, ge=1, strict=True)
    lr: float = Field(1e-2, gt=0.0)
    target: Target = "task"
    prior_weight: float | None = Field(None, ge=0.0)
    cv_folds: int = Field(5, ge=2, strict=True)
    pca: int | None = Field(None, ge=1, strict=True)
    decision: Literal["probability", "utility"] = "probability"


class ClusteredOptions(_Options):
    """Options of the clustered router (k-means on the features).

    Attributes:
        clusters: k-means clusters (default: the number of experts).
        cluster_temperature: softmax temperature of each cluster's expert distribution.
    """

    clusters: int | None = Field(None, ge=1, strict=True)
    cluster_temperature: float = Field(1.0, gt=0.0)


class MBCOptions(_Options):
    """Options of MBC: experts grouped by ΔW similarity, merged per group, then routed across groups.

    Attributes:
        mbc_clusters: the number of expert groups (required with ``router="mbc"``).
        mbc_router: how it routes across groups: ``"learned"``/``"clustered"`` (default with validation
            data) or ``"arrow"`` (default without).
        sketch: similarity from a random-projection sketch of this side (``None``: exact).
        mbc_merge: ``"uniform"`` (average) or ``"task_arithmetic"`` (sum) within a group.
    """

    mbc_clusters: int | None = Field(None, ge=1, strict=True)
    mbc_router: Literal["learned", "clustered", "arrow"] | None = None
    sketch: int | None = Field(None, ge=1, strict=True)
    mbc_merge: Literal["uniform", "task_arithmetic"] = "uniform"


class ArrowOptions(_Options):
    """Options of Arrow (per-token, zero-shot routing).

    Attributes:
        temperature: its softmax temperature, one number or one per module name (``"default"`` for the rest).
        subtract_mean: route by each expert's update minus the experts' mean (GenKnowSub): the prototypes
            then ignore what every expert learned alike; the update applied is the same.
    """

    temperature: float | dict[str, float] = 1.0
    subtract_mean: bool = False

    @field_validator("temperature")
    @classmethod
    def _positive(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        values = value.values() if isinstance(value, dict) else [value]
        if any(v <= 0 for v in values):
            raise ValueError(f"temperature: expected numbers > 0 (one, or one per module name), got {value!r}")
        return value


class RouteConfig(LearnedOptions, ClusteredOptions, MBCOptions, ArrowOptions):
    """Everything :func:`~adapterfuse.backends.route.api.route` is told besides experts, base and data.

    Attributes:
        router: ``"learned"`` (classifier on base features), ``"clustered"`` (k-means on them), ``"mbc"``
            (experts grouped and merged, then routed by ``mbc_router``) or ``"arrow"`` (per token, zero-shot).
        top_k: experts kept per input (per token for Arrow).
        then: ``"ensemble"`` (one batched pass over the chosen experts) or ``"merge"`` (linear merge).
        on: route on the ``"prompt"`` or the raw input ``"fields"`` (no template).
        layer: base layer whose mean-pooled hidden state is the feature (0: embeddings; -1: last).
        shape: append the routing text's shape to the features (``True``, ``False`` or a shape version
            ``0 .. 2``); ``None``: only when routing on the raw fields.
        readout: ``"mean"`` over the tokens, or ``"mean_last"``: the mean and the last token's state.
        pooling: pooling of ``then="ensemble"`` with ``top_k > 1``.
        emr: route to each expert's EMR-Merging update instead of the expert itself: one elected update
            with that task's mask and rescaler (:mod:`adapterfuse.backends.merge.emr`).
        abstain: the share of validation inputs the router is least sure of: an input it is no surer of
            (its top expert's probability below theirs) is not routed but gets ``fallback``; ``None``:
            every input is routed. For inputs of a task no expert knows.
        fallback: what an abstained input gets: ``"mix"`` (every expert merged uniformly, one pass) or
            ``"base"`` (the base alone).
        budget: keep at most this many experts, chosen greedily by validation gain (needs validation).
        seed: seed of k-means, the router's initialisation, sketches and power iteration.
        batch_size, autocast, max_length: scoring and feature settings.
        max_validation_examples: fit on at most this many validation examples per task.
        name: the predictor's name in tables.
    """

    router: Router = "learned"
    top_k: int = Field(1, ge=1, strict=True)
    then: Literal["ensemble", "merge"] = "ensemble"
    on: Literal["prompt", "fields"] = "prompt"
    layer: int = Field(DEFAULT_LAYER, strict=True)
    shape: bool | int | None = None
    readout: Literal["mean", "mean_last"] = "mean"
    pooling: Literal["linear", "log_linear"] = "linear"
    emr: bool = False
    abstain: float | None = Field(None, gt=0.0, lt=1.0)
    fallback: Literal["mix", "base"] = "mix"
    budget: int | None = Field(None, ge=1, strict=True)
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True)
    batch_size: int = Field(32, ge=1, strict=True)
    autocast: bool = True
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=1, strict=True)
    max_validation_examples: int | None = Field(None, ge=1, strict=True)
    name: str | None = None

    @field_validator("shape")
    @classmethod
    def _shape_version(cls, value: bool | int | None) -> bool | int | None:
        if value is not None and not isinstance(value, bool) and value not in range(len(SHAPE_DIMS)):
            raise ValueError(
                f"shape: {value!r} is not a shape version; expected True, False or one of "
                f"0 .. {len(SHAPE_DIMS) - 1} (0: none, 1: the four counts, 2: counts and asymmetry)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RouteConfig:
        if self.decision == "utility" and (self.router != "learned" or self.target != "task"):
            raise ValueError(
                f"decision 'utility': needs router='learned' with target='task' (a posterior over the "
                f"input's task), got router={self.router!r}, target={self.target!r}; use "
                "decision='probability'"
            )
        if self.emr and self.router == "mbc":
            raise ValueError("emr: MBC merges its own groups of experts; use emr with router 'learned' or 'clustered'")
        if self.abstain is not None and self.router == "arrow":
            raise ValueError(
                "abstain: Arrow routes each token with no confidence to abstain on; use router='learned' "
                "or 'clustered', or remove abstain"
            )
        if "fallback" in self.model_fields_set and self.abstain is None:
            raise ValueError("fallback: what an abstained input gets, but abstain is not set; set abstain (e.g. 0.05)")
        if self.router == "mbc" and self.mbc_clusters is None:
            raise ValueError(
                "mbc_clusters: router 'mbc' needs the number of expert groups, got none; set "
                "mbc_clusters to an integer in 1 .. the number of experts"
            )
        self._own_kind_only()  # after the checks above, whose messages say more about these cases
        return self

    def _own_kind_only(self) -> None:
        # One sub-model per router kind: an option given for a kind this config does not fit is refused, so a
        # misplaced option is never silently ignored. MBC takes the options of the router it routes with.
        kinds = {self.router} if self.router != "mbc" else {"mbc", self.mbc_router or "learned"}
        if self.router == "mbc" and self.mbc_router is None:
            kinds.add("arrow")  # MBC without validation data routes with Arrow
        for kind, options in ROUTER_OPTIONS.items():
            given = sorted(set(options.model_fields) & self.model_fields_set)
            if given and kind not in kinds:
                raise ValueError(
                    f"{given[0]}: an option of router {kind!r}, but router is {self.router!r}"
                    + (f" across {sorted(kinds - {'mbc'})}" if self.router == "mbc" else "")
                    + f"; remove {given[0]} or set router={kind!r}"
                )

    def across(self, has_data: bool) -> str:
        """The router MBC routes across groups with: ``mbc_router``, else learned with data, arrow without."""
        return self.mbc_router or ("learned" if has_data else "arrow")

    def kind(self, has_data: bool) -> str:
        """The router actually fitted: ``router``, or for MBC the one across its groups."""
        return self.across(has_data) if self.router == "mbc" else self.router

    def fit_options(self) -> dict[str, Any]:
        """The learned router's training settings (hidden, epochs, lr, seed, pca)."""
        return {"hidden": self.hidden, "epochs": self.epochs, "lr": self.lr, "seed": self.seed, "pca": self.pca or 0}


ROUTER_OPTIONS: dict[str, type[_Options]] = {
    "learned": LearnedOptions,
    "clustered": ClusteredOptions,
    "mbc": MBCOptions,
    "arrow": ArrowOptions,
}
"""Each router kind's own options: a :class:`RouteConfig` refuses those of a kind it does not fit."""


def check_route(config: RouteConfig, n_experts: int, has_data: bool) -> None:
    """The checks that need the expert count and whether validation data is given (no weight is read).

    Args:
        config: the validated options.
        n_experts: how many experts will be routed to.
        has_data: whether validation data (or routing data) is given.

    Raises:
        ConfigError: ``mbc_clusters`` above the expert count, ``top_k`` above the experts (or MBC groups),
            or a router that fits on validation data without any.
    """
    routed_to = n_experts
    if config.router == "mbc":
        groups = int(config.mbc_clusters or 0)
        if groups > n_experts:
            raise ConfigError(
                f"mbc_clusters: expected an integer in 1 .. {n_experts} (the number of experts), got {groups}"
            )
        routed_to = groups
    if config.top_k > routed_to:
        raise ConfigError(
            f"top_k: {config.top_k} is larger than the number of experts to route to ({routed_to}); "
            f"expected 1 .. {routed_to}"
        )
    if (config.kind(has_data) != "arrow" or config.budget is not None) and not has_data:
        raise ConfigError(
            f"validation: router {config.router!r} fits on the validation split, got none; pass "
            "validation=[TaskData, ...] (or router='arrow', which needs no data)"
        )
