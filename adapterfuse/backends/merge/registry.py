"""The explicit registry of merge methods and the common entry point :func:`merge_deltas`.

Adding a method means writing a module with a ``METHOD`` record (see :class:`.common.MergeMethod`) and
listing it in :data:`METHODS` below; nothing is discovered implicitly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adapterfuse.backends.merge import dare_linear, dare_ties, iso_c, knots, task_arithmetic, ties, tsv, uniform
from adapterfuse.backends.merge.common import (
    MergeMethod,
    MergeResult,
    ModuleJob,
    check_finite,
    parse_params,
    pooled_error,
)
from adapterfuse.delta import Deltas, LowRank
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.lowrank import Truncation

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        uniform.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare_linear.METHOD,
        dare_ties.METHOD,
        iso_c.METHOD,
        tsv.METHOD,
        knots.METHOD,
    )
}
"""Method name -> its record, in a fixed order."""


def available_methods() -> list[str]:
    """The names :func:`merge_deltas` accepts, in registry order."""
    return list(METHODS)


def get_method(name: str) -> MergeMethod:
    """Look a method up by name.

    Args:
        name: the method's name, e.g. ``"ties"``.

    Returns:
        Its record.

    Raises:
        ConfigError: if no method has that name; the message lists the known ones.
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"unknown merge method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def _check_factor(i: int, module: str, delta: object) -> tuple[int, int]:
    """One expert's update of one module must be a finite, consistent fp LowRank; return its ΔW shape."""
    where = f"expert {i}, module {module!r}"
    if not isinstance(delta, LowRank):
        raise CompatibilityError(f"{where}: expected a LowRank update, got {type(delta).__name__}")
    A, B = delta.A, delta.B
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and A.dim() == 2 and B.dim() == 2):
        raise CompatibilityError(f"{where}: A and B must be 2-D tensors")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise CompatibilityError(f"{where}: A and B must be floating point, got {A.dtype} and {B.dtype}")
    if A.shape[0] != B.shape[1]:
        raise CompatibilityError(
            f"{where}: A has rank {A.shape[0]} but B has rank {B.shape[1]}; "
            "expected A [r, in] and B [out, r] with the same r"
        )
    for part, t in (("A", A), ("B", B)):
        if not bool(torch.isfinite(t).all()):
            raise CompatibilityError(
                f"{where}: factor {part} contains NaN or inf; the expert is corrupt "
                "(retrain it or drop it from the merge)"
            )
    return delta.shape


def validation_by_task(method: str, experts: Sequence[Any], tasks: Sequence[Any]) -> dict[str, Any]:
    """The validation data of each expert's task, by task name, for a method that reads it.

    Raises:
        ConfigError: an expert whose task has no data among ``tasks``, naming the expert and its task.
    """
    by_task = {t.task.name: t for t in tasks}
    missing = {e.name: e.task for e in experts if e.task not in by_task}
    if missing:
        raise ConfigError(
            f"{method}: experts {missing} (name: task) have no validation data among tasks {sorted(by_task)}; "
            "give validation data of every expert's task"
        )
    return by_task


def check_experts(experts: Sequence[Mapping[str, LowRank]]) -> dict[str, list[int]]:
    """Validate the experts without doing any merge maths.

    Args:
        experts: one ``module -> LowRank`` mapping per expert.

    Returns:
        The coverage: module -> ascending indices of the experts that have it, modules sorted.

    Raises:
        ConfigError: if ``experts`` is not a non-empty sequence of mappings.
        CompatibilityError: for a non-finite or malformed factor (naming expert and module), a module
            whose ΔW shape differs between experts (naming the module, the expected and the got shape),
            experts on different devices, or experts with no module at all.
    """
    if isinstance(experts, Mapping) or not isinstance(experts, Sequence) or not experts:
        raise ConfigError(
            "experts must be a non-empty list of module -> LowRank mappings, got "
            f"{type(experts).__name__}"
            + (" (a single expert? wrap it in a list)" if isinstance(experts, Mapping) else "")
        )
    shapes: dict[str, tuple[int, tuple[int, int]]] = {}
    coverage: dict[str, list[int]] = {}
    devices: set[torch.device] = set()
    for i, expert in enumerate(experts):
        if not isinstance(expert, Mapping):
            raise ConfigError(f"expert {i}: expected a module -> LowRank mapping, got {type(expert).__name__}")
        for module, delta in expert.items():
            shape = _check_factor(i, module, delta)
            first = shapes.setdefault(module, (i, shape))
            if first[1] != shape:
                raise CompatibilityError(
                    f"module {module!r}: expert {i} has ΔW shape {shape}, expected "
                    f"{first[1]} (as in expert {first[0]}); experts must share a base"
                )
            coverage.setdefault(module, []).append(i)
            devices.update((delta.A.device, delta.B.device))
    if len(devices) > 1:
        raise CompatibilityError(
            f"experts' factors are on several devices {sorted(map(str, devices))}; move them to one device first"
        )
    if not coverage:
        raise CompatibilityError("no expert has any module; there is nothing to merge")
    return {m: coverage[m] for m in sorted(coverage)}


def merge_deltas(
    experts: Sequence[Mapping[str, LowRank]],
    method: str,
    weights: Sequence[float] | None = None,
    rank: int | str | None = None,
    seed: int = 0,
    **params: Any,
) -> MergeResult:
    """Merge experts' per-module updates with a registered method.

    Everything is validated before any maths. Modules are the union over experts; an expert lacking a
    module contributes a zero update there. Modules are merged one at a time, in fp32.

    Args:
        experts: one ``module -> LowRank`` mapping per expert (ranks and module sets may differ).
        method: a name from :func:`available_methods`.
        weights: one finite weight per expert; ``None`` means 1 each.
        rank: output rank per module: a number, ``"auto"`` (the smallest rank keeping ``energy`` of each
            module's ΔW) or ``"exact"``. ``None``: ``exact`` for ``uniform``/``task_arithmetic`` (rank
            ``sum r_i``), ``auto`` for the TIES/DARE methods.
        seed: seed of DARE masks and of the randomized SVD.
        **params: method parameters (``lambda``, ``density``, ``energy``, ``exact_svd``, the sign convention
            of ``ties``/``dare_ties``; see each method's model).

    Returns:
        The merged updates with per-module and overall truncation errors and the coverage.

    Raises:
        ConfigError: unknown method, unknown or invalid parameter (density outside ``(0, 1]``, NaN or inf
            weight or lambda, rank < 1), a weight count that differs from the expert count, or a merged
            module that overflows float32 (naming the module).
        CompatibilityError: see :func:`check_experts`.
    """
    spec = get_method(method)
    raw: dict[str, Any] = {"weights": weights, "rank": rank, "seed": seed, **params}
    parsed = parse_params(method, spec.params, raw)
    coverage = check_experts(experts)
    if parsed.weights is not None and len(parsed.weights) != len(experts):
        raise ConfigError(
            f"got {len(parsed.weights)} weights for {len(experts)} experts; "
            "give exactly one weight per expert (or none)"
        )
    all_weights = parsed.weights if parsed.weights is not None else (1.0,) * len(experts)
    parsed = parsed.model_copy(update={"weights": all_weights})
    out: Deltas = {}
    errors: dict[str, float] = {}
    parts: list[Truncation] = []
    for module, present in coverage.items():
        job = ModuleJob(
            module=module,
            experts=tuple(present),
            deltas=tuple(experts[i][module].to(torch.float32) for i in present),
            weights=tuple(all_weights[i] for i in present),
            all_weights=all_weights,
        )
        result = spec.merge_module(job, parsed)
        check_finite(module, result.delta)  # per module, so nothing non-finite is ever written
        out[module], errors[module] = result.delta, result.error
        parts.append(result)
    return MergeResult(
        method=spec.name,
        params=parsed,
        deltas=out,
        per_module_error=errors,
        overall_error=pooled_error(parts),
        coverage=coverage,
    )
