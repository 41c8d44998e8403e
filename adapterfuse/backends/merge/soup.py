"""Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482) over experts' ΔW.

Each expert is scored alone on the validation tasks (average ``score``); experts are sorted best
first (ties by name); the soup starts with the best one, and each next expert is added to the running
merge (``uniform`` by default) only if the soup's validation average strictly improves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field, field_validator, model_validator

from adapterfuse.backends.merge.adapter import MergedAdapter, SearchMethod, params_json
from adapterfuse.backends.merge.common import MergeParams, MergeResult
from adapterfuse.backends.merge.lambda_search import AdapterHost, EvalOptions
from adapterfuse.backends.merge.registry import METHODS, merge_deltas
from adapterfuse.base import BaseModel
from adapterfuse.delta import peft_from_deltas
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.library import ExpertLibrary
from adapterfuse.tasks.spec import TaskData


class SoupParams(MergeParams):
    """Parameters of ``greedy_soup``.

    Attributes:
        combine: the registered method that merges the soup's members (``uniform``: Wortsman's average).
        density: passed to ``combine`` when it takes one (TIES/DARE).
    """

    combine: str = "uniform"
    density: float | None = Field(default=None, gt=0.0, le=1.0)

    @field_validator("weights")
    @classmethod
    def _no_weights(cls, weights: tuple[float, ...] | None) -> None:
        """The soup chooses its members itself; given weights would be silently ignored."""
        if weights is not None:
            raise ValueError("greedy_soup chooses its members on validation data and takes no weights")
        return None

    @field_validator("combine")
    @classmethod
    def _known(cls, combine: str) -> str:
        if combine not in METHODS:
            raise ValueError(f"combine must be a registered merge method ({', '.join(METHODS)})")
        return combine

    @model_validator(mode="after")
    def _density_fits(self) -> SoupParams:
        if self.density is not None and "density" not in METHODS[self.combine].params.model_fields:
            raise ValueError(f"density given but combine={self.combine!r} takes none")
        return self


def greedy_select(
    order: Sequence[str], alone: dict[str, float], score_with: Callable[[list[str]], float]
) -> tuple[list[str], list[dict[str, Any]], float]:
    """The greedy-soup loop, independent of models (so it can be tested on its own).

    Args:
        order: candidate names, best first (NaN scores last: :func:`soup_order`).
        alone: each candidate's score alone; the first one's is the soup's starting score.
        score_with: the score of the soup made of the given names.

    Returns:
        ``(kept names, one record per candidate, final soup score)``; a record holds ``name``,
        ``alone``, ``with`` (the soup's score with it; ``None`` for the first and for a NaN candidate)
        and ``kept``.

    Raises:
        ConfigError: no candidate has a finite score alone.
    """
    if not order or not math.isfinite(alone[order[0]]):
        raise ConfigError(
            f"greedy_soup: every candidate {list(order)} scored NaN alone on validation, expected at least one "
            "finite score; check the validation data and the experts"
        )
    kept = [order[0]]
    best = alone[order[0]]
    records: list[dict[str, Any]] = [{"name": order[0], "alone": alone[order[0]], "with": None, "kept": True}]
    for name in order[1:]:
        if not math.isfinite(alone[name]):  # a NaN candidate is never tried, so it can never win
            records.append({"name": name, "alone": alone[name], "with": None, "kept": False})
            continue
        score = score_with([*kept, name])
        improves = score > best  # strictly (and never NaN): an expert that changes nothing is left out
        records.append({"name": name, "alone": alone[name], "with": score, "kept": improves})
        if improves:
            kept.append(name)
            best = score
    return kept, records, best


def soup_order(alone: dict[str, float]) -> list[str]:
    """Candidates best first, ties by name, NaN scores last (a plain sort misplaces NaN anywhere)."""
    return sorted(alone, key=lambda n: (not math.isfinite(alone[n]), -alone[n] if math.isfinite(alone[n]) else 0, n))


def _merge_subset(experts: Sequence[Expert], params: SoupParams) -> MergeResult:
    extra = {} if params.density is None else {"density": params.density}
    return merge_deltas([e.deltas for e in experts], params.combine, rank=params.rank, seed=params.seed, **extra)


def run(
    library: ExpertLibrary, params: SoupParams, base: BaseModel, tasks: list[TaskData], options: EvalOptions
) -> MergedAdapter:
    """Fit the greedy soup (the runner registered as ``greedy_soup``).

    Args:
        library: the checked experts.
        params: validated :class:`SoupParams`.
        base: the frozen base.
        tasks: validation tasks.
        options: scoring settings.

    Returns:
        The soup of the kept experts, with the order, scores and choices under ``search["soup"]``.
    """
    host = AdapterHost(base, options)
    alone = {e.name: host.score(*e.as_lora(), tasks, name=e.name) for e in library}
    order = soup_order(alone)

    def score_with(names: list[str]) -> float:
        result = _merge_subset([library[n] for n in names], params)
        return host.score(*peft_from_deltas(result.deltas, base.spec), tasks, name="soup")

    kept, records, final = greedy_select(order, alone, score_with)
    members = [library[n] for n in kept]
    result = _merge_subset(members, params)
    record = {
        "order": order,
        "candidates": records,
        "kept": kept,
        "score": final,
        "criterion": "average validation score",
        "tasks": [t.task.name for t in tasks],
    }
    dropped = [n for n in order if n not in kept]
    notes = [f"greedy_soup left out {dropped}: they did not strictly improve the validation average"] * bool(dropped)
    return MergedAdapter.build(
        result,
        members,
        base,
        method="greedy_soup",
        params=params_json(params),
        search={"soup": record},
        notes=[*library.notes, *notes],
    )


METHOD = SearchMethod(
    name="greedy_soup",
    paper="https://arxiv.org/abs/2203.05482",
    summary="add experts best-first to a uniform merge, keeping each only if the validation average improves",
    params=SoupParams,
    run=run,
)
