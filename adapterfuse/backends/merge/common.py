"""Shared types of the merge methods: parameter models, per-module jobs, method records and results.

Every method is a :class:`MergeMethod`: a name, a paper, a frozen pydantic parameter model that rejects
unknown keys, and a function that merges *one module* (:class:`ModuleJob` -> :class:`Truncation`).
The loop over modules, the input validation and the error pooling live in :mod:`.registry`, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from adapterfuse.backends.merge.functional import Divide, SignOn
from adapterfuse.backends.options import MAX_SEED
from adapterfuse.delta import Deltas, LowRank
from adapterfuse.errors import ConfigError
from adapterfuse.lowrank import (
    Truncation,
    dense_energy_truncation,
    dense_factors,
    dense_truncation,
    factor_truncation,
    stack_factors,
)


def _check_rank(value: Any) -> Any:
    """One message for every bad rank, instead of one per member of the union."""
    if value is None or value in ("auto", "exact"):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number greater than or equal to 1, 'auto' or 'exact'")
    return value


Rank = int | Literal["auto", "exact"]
"""An output rank: a fixed number, ``auto`` (the smallest rank keeping ``energy`` of ΔW) or ``exact`` (all of it)."""

CONVENTIONS: dict[str, tuple[SignOn, Divide]] = {
    "mergekit": ("weighted", "weight"),
    "peft": ("unweighted", "count"),
}
"""Named sign-election conventions: ``(sign_on, divide)`` of mergekit's ``ties`` (``normalize: true``) and of
PEFT's ``ties`` / ``ties_svd`` / ``dare_ties``."""


class MergeParams(BaseModel):
    """Parameters every method takes.

    Attributes:
        weights: one finite weight per expert; ``None`` means 1 for every expert.
        rank: the output rank per module: a number, ``auto`` (per module, the smallest rank that keeps
            ``energy`` of the merged ΔW's squared Frobenius norm) or ``exact`` (everything the method
            computed). ``None`` means the method's default: ``exact`` for the linear methods, ``auto`` for
            TIES, DARE and Fisher.
        energy: the share of ``||ΔW||_F^2`` that ``rank="auto"`` keeps, in ``(0, 1]``; 0.9 bounds each
            module's relative error by ``sqrt(0.1)``, about 0.32.
        seed: seed of every random choice (DARE masks, randomized SVD).
    """

    # Frozen so a result's recorded parameters cannot drift; extra="forbid" so a typo such as
    # "densty" is an error instead of a silently ignored key; no NaN/inf in any float field.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    weights: tuple[float, ...] | None = None
    rank: Annotated[Rank | None, BeforeValidator(_check_rank)] = None
    energy: float = Field(default=0.9, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED, strict=True)


class UniformParams(MergeParams):
    """Parameters of ``uniform``: weights, if given, must be >= 0 with a positive sum."""

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: tuple[float, ...] | None) -> tuple[float, ...] | None:
        """A soup is a (weighted) average: negative or all-zero weights make no average."""
        if weights is not None:
            bad = [i for i, w in enumerate(weights) if w < 0]
            if bad:
                raise ValueError(
                    f"uniform averages, so weights must be >= 0; weights{bad} are negative "
                    "(use task_arithmetic for negative weights)"
                )
            if weights and sum(weights) <= 0:
                raise ValueError("uniform weights must have a positive sum, got all zeros")
        return weights


class LinearParams(MergeParams):
    """Parameters of ``task_arithmetic``: adds ``lambda``, the scale of the summed task vectors."""

    lam: float = Field(default=1.0, validation_alias=AliasChoices("lambda", "lam"), serialization_alias="lambda")


class SignParams(LinearParams):
    """The sign-election convention of ``ties`` and ``dare_ties`` (see docs/merge.md for the table).

    Attributes:
        convention: ``mergekit`` or ``peft``, shorthand for the two fields below (:data:`CONVENTIONS`);
            ``None`` leaves them as given. Giving a convention and a field that contradicts it is an error.
        sign_on: elect each entry's sign on the ``weighted`` values (mergekit) or the ``unweighted`` ones
            (PEFT, which weights only when summing).
        divide: divide the agreeing weighted sum by the ``count`` of agreeing experts (PEFT), by the sum of
            their absolute weights (``weight``, mergekit's ``normalize: true``), or by nothing (``none``,
            mergekit's ``normalize: false``). The default, mergekit's, makes the result a weighted mean of the agreeing
            entries: rescaling every weight changes nothing (λ is the overall scale) and equal weights give
            the paper's disjoint mean. Mergekit divides by the signed sum of weights; the absolute value
            here differs only for negative weights, where the signed sum would undo the negation.
    """

    convention: Literal["mergekit", "peft"] | None = None
    sign_on: SignOn = "weighted"
    divide: Divide = "weight"

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """Fill ``sign_on`` and ``divide`` from a named convention, refusing a contradicting field."""
        if not isinstance(data, dict) or data.get("convention") not in CONVENTIONS:
            return data
        preset = dict(zip(("sign_on", "divide"), CONVENTIONS[data["convention"]], strict=True))
        clash = {k: data[k] for k, v in preset.items() if data.get(k, v) != v}
        if clash:
            raise ValueError(
                f"convention {data['convention']!r} means sign_on={preset['sign_on']!r}, divide="
                f"{preset['divide']!r}, got {clash}; give the convention or the two fields, not both"
            )
        return {**data, **preset}


class TiesParams(SignParams):
    """Parameters of ``ties``.

    Attributes:
        density: fraction of each expert's entries kept by magnitude, in ``(0, 1]``; 0.2 is the TIES
            paper's top-20% default.
        exact_svd: truncate the merged ΔW with a full SVD (true) or, by default, a seeded randomized SVD
            (4 power iterations, 8 extra vectors; docs/merge.md compares the two).
    """

    density: float = Field(default=0.2, gt=0.0, le=1.0)
    exact_svd: bool = Field(default=False, strict=True)


class DareParams(LinearParams):
    """Parameters of ``dare_linear``.

    Attributes:
        density: keep probability of each entry, in ``(0, 1]`` (1 - the paper's drop rate). The
            default 0.5 is conservative: LoRA updates are far smaller than full fine-tuning deltas,
            so the paper's 0.1 can erase them.
        exact_svd: as in :class:`TiesParams`.
    """

    density: float = Field(default=0.5, gt=0.0, le=1.0)
    exact_svd: bool = Field(default=False, strict=True)


class DareTiesParams(DareParams, SignParams):
    """Parameters of ``dare_ties``: those of ``dare_linear`` plus the sign-election convention of ``ties``."""


def param_names(model: type[MergeParams]) -> list[str]:
    """The keys a parameter model accepts, as a user writes them (``lambda``, not ``lam``)."""
    return sorted(f.serialization_alias or name for name, f in model.model_fields.items())


def _where(loc: tuple[int | str, ...]) -> str:
    """``("weights", 1)`` -> ``weights[1]``."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


def parse_params(method: str, model: type[MergeParams], raw: dict[str, Any]) -> MergeParams:
    """Validate raw parameters against a method's model, turning pydantic errors into :class:`ConfigError`.

    Args:
        method: the method's name, for the message.
        model: its parameter model.
        raw: the parameters as given.

    Returns:
        The validated, frozen parameters.

    Raises:
        ConfigError: naming each bad key, why, the value given, and the keys the method accepts.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_where(e['loc']) or 'parameters'}: {e['msg']} (got {e['input']!r})" for e in exc.errors()
        )
        raise ConfigError(
            f"merge method {method!r}: invalid parameters: {problems}. "
            f"Accepted parameters: {', '.join(param_names(model))}"
        ) from None


@dataclass(frozen=True)
class ModuleJob:
    """Everything a method needs to merge one module.

    Attributes:
        module: the module's name.
        experts: indices of the experts that have this module, ascending.
        deltas: their updates (fp32), in the order of ``experts``.
        weights: their weights, in the order of ``experts``.
        all_weights: every expert's weight, present here or not (``uniform`` divides by their sum,
            because an expert lacking the module counts as a zero update, not as absent).
    """

    module: str
    experts: tuple[int, ...]
    deltas: tuple[LowRank, ...]
    weights: tuple[float, ...]
    all_weights: tuple[float, ...]

    def weight_tensor(self, device: torch.device) -> torch.Tensor:
        """The weights of the experts present, as an fp32 ``[K]`` tensor on ``device``."""
        return torch.tensor(self.weights, dtype=torch.float32, device=device)


ModuleFn = Callable[[ModuleJob, Any], Truncation]
"""Merges one module: ``(job, validated params) -> Truncation`` (merged update, its error and norm)."""


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: the key users pass as ``method``.
        paper: URL of the paper that defines it.
        summary: one line on what it computes.
        params: its frozen parameter model.
        merge_module: its per-module function.
    """

    name: str
    paper: str
    summary: str
    params: type[MergeParams]
    merge_module: ModuleFn


@dataclass(frozen=True)
class MergeResult:
    """The outcome of a merge.

    Attributes:
        method: the method's name.
        params: the validated parameters (weights resolved to one per expert).
        deltas: module -> merged update, in fp32.
        per_module_error: module -> ``||ΔW - ΔW_r||_F / ||ΔW||_F`` of the rank truncation (0 if none).
        overall_error: the same over all modules together: ``sqrt(sum_m e_m^2 n_m^2 / sum_m n_m^2)``
            where ``n_m`` is the untruncated merged ``||ΔW_m||_F``; 0 when every ``n_m`` is 0.
        coverage: module -> indices of the experts that have it.
    """

    method: str
    params: MergeParams
    deltas: Deltas
    per_module_error: dict[str, float]
    overall_error: float
    coverage: dict[str, list[int]]

    def scaled(self, lam: float) -> MergeResult:
        """The same merge with λ multiplied by ``lam``, without merging again.

        Every λ method applies λ as one scalar on the merged ΔW before the rank truncation, and the
        truncation of λ·M is λ times the truncation of M with the same relative error. So scaling the
        B factors is the merge at λ·``self.lam``, exactly in exact arithmetic.
        """
        params = self.params.model_copy(update={"lam": self.params.lam * lam})
        deltas = {m: LowRank(d.A, d.B * lam) for m, d in self.deltas.items()}
        check_finite_deltas(deltas, f"merged ΔW at lambda {lam:g}")
        return MergeResult(self.method, params, deltas, self.per_module_error, self.overall_error, self.coverage)


def pooled_error(parts: list[Truncation]) -> float:
    """The relative Frobenius error of several modules taken as one long vector.

    Args:
        parts: each module's truncation (relative error and untruncated norm).

    Returns:
        ``sqrt(sum (error * norm)^2 / sum norm^2)``, 0 when every norm is 0.
    """
    total = sum(t.norm**2 for t in parts)
    if total <= 0.0:
        return 0.0
    return math.sqrt(sum((t.error * t.norm) ** 2 for t in parts) / total)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_finite(module: str, values: torch.Tensor | LowRank, what: str = "merged ΔW") -> None:
    """Refuse a merged update with NaN or inf entries, before it is truncated or written.

    A merge of finite experts overflows float32 only when weights or λ are huge; every later step (the
    SVD, the saved file, a full model) would then fail or carry the non-finite values silently.

    Args:
        module: the module's name, for the message.
        values: a dense ΔW, or a factored update (its factors and ``B @ A`` are checked).
        what: what ``values`` is, for the message.

    Raises:
        ConfigError: naming the module, how many entries are not finite and the fix.
    """
    parts = [values.A, values.B, values.dense()] if isinstance(values, LowRank) else [values]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in parts)
    if bad:
        raise ConfigError(
            f"module {module!r}: the {what} has {bad} NaN/inf entries, expected all finite: the weights or "
            f"lambda overflow float32 (largest {FLOAT32_MAX:.3g}); use smaller weights or lambda (nothing was written)"
        )


def check_finite_deltas(deltas: Deltas, what: str = "merged ΔW") -> None:
    """:func:`check_finite` on every module, in sorted order (the first bad module is named)."""
    for module in sorted(deltas):
        check_finite(module, deltas[module], what)


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse a full merged model with NaN or inf weights (``W + ΔW`` can overflow a half-precision base).

    Raises:
        ConfigError: naming the first bad weight, its dtype, how many entries are not finite and the fix.
    """
    for name, weight in sorted(model.state_dict().items()):
        if weight.is_floating_point():
            bad = int((~torch.isfinite(weight)).sum())
            if bad:
                raise ConfigError(
                    f"full model: weight {name!r} ({weight.dtype}) has {bad} NaN/inf entries after adding ΔW, "
                    "expected all finite; save the adapter instead of the full model, load the base in float32, "
                    "or use smaller weights or lambda (nothing was written)"
                )


def linear_output(
    items: list[tuple[float, LowRank]], rank: Rank | None, energy: float = 0.9, module: str = ""
) -> Truncation:
    """The exact weighted sum of updates in factored form, truncated as ``rank`` says.

    Args:
        items: ``(weight, update)`` pairs of one module.
        rank: ``None`` or ``exact`` keeps the exact stacked rank ``sum(r_i)``; a number truncates to it;
            ``auto`` keeps the smallest rank holding ``energy`` of ``||ΔW||_F^2``. Never a full-size SVD.
        energy: the share ``auto`` keeps.
        module: the module's name, for the message of an overflow.

    Returns:
        The (possibly truncated) sum with its error and untruncated norm.

    Raises:
        ConfigError: the weighted sum is not finite (see :func:`check_finite`).
    """
    stacked = stack_factors(items)
    check_finite(module, stacked)
    if rank == "auto":
        return factor_truncation(stacked, stacked.rank, energy=energy)
    # Truncating to the stacked rank itself returns the factors untouched but still measures the norm,
    # which the pooled error over all modules needs.
    return factor_truncation(stacked, stacked.rank if rank in (None, "exact") else int(rank))


def truncate_output(merged: torch.Tensor, job: ModuleJob, params: TiesParams | DareParams) -> Truncation:
    """Bring a dense merged ΔW (TIES, DARE) to the output rank.

    ``auto`` (the default) keeps the smallest rank holding ``params.energy`` of ``||ΔW||_F^2``, starting its
    search at the experts' stacked rank; a number truncates to that rank; ``exact`` keeps ΔW whole, as
    factors of rank ``min(out, in)``.
    """
    check_finite(job.module, merged)  # an SVD of inf/NaN fails with a LinAlgError deep in torch
    rank = "auto" if params.rank is None else params.rank
    if rank == "exact":
        return dense_factors(merged)
    if rank == "auto":
        start = sum(d.rank for d in job.deltas)
        return dense_energy_truncation(merged, params.energy, exact=params.exact_svd, seed=params.seed, start=start)
    return dense_truncation(merged, int(rank), exact=params.exact_svd, seed=params.seed)
