"""The model card of a merged adapter: sources, method, parameters, the rank and error of every module,
searches and harness scores (so a reader sees what a rank policy kept)."""

from __future__ import annotations

from typing import Any

from adapterfuse.io.card import CardSpec, build_card, scores_from


# `adapter` is a MergedAdapter, typed Any: the adapter module imports this one, so naming its class would be a circle.
def merged_card(adapter: Any, full: bool = False, load_from: str = "merged-adapter") -> str:
    """The ``README.md`` of a merged adapter (or, with ``full``, of the merged full model).

    Args:
        adapter: the merged adapter (:class:`~adapterfuse.backends.merge.adapter.MergedAdapter`).
        full: the folder holds base weights + ΔW as a plain transformers model.
        load_from: the Hub repo id or folder the load snippet names.

    Returns:
        The card's text (see :func:`adapterfuse.io.card.build_card`).
    """
    params = ", ".join(f"{k}={v}" for k, v in sorted(adapter.params.items()) if v is not None)
    sources = adapter.sources
    latest = adapter.evaluation[-1] if adapter.evaluation else None
    spec = CardSpec(
        title=f"merged adapter ({adapter.method})",
        summary=f"{'A full model with' if full else 'A LoRA adapter holding'} the merge of {len(sources)} "
        f"expert{'s' * (len(sources) != 1)} by `{adapter.method}` (maths: `{adapter.result.method}`), "
        "made with adapterfuse.",
        base_model=adapter.base.get("spec"),
        library_name="transformers" if full else "peft",
        load_from=load_from,
        tags=("lora", "merge", adapter.method),
        tasks=tuple(dict.fromkeys(str(s["task"]) for s in sources if s.get("task"))),
        scores=scores_from(latest["tasks"]) if latest else (),
        facts=(
            f"base: `{adapter.base.get('spec')}` (fingerprint `{str(adapter.base.get('fingerprint'))[:23]}…`)",
            f"parameters: {params}",
            f"adapter parameters: {adapter.num_params:,}",
            f"relative truncation error (Frobenius, all modules): {adapter.overall_error:.3e}",
            f"worst module: {_worst_module(adapter.per_module_error)}",
        ),
        sections=_sections(adapter),
        command=adapter.command,
        recipe={"method": adapter.method, "params": adapter.params, "sources": [s["name"] for s in sources]},
    )
    return build_card(spec)


def _sections(adapter: Any) -> tuple[str, ...]:
    lines = ["", "## Sources", ""]
    lines += [
        f"- `{s['name']}` (task {s['task']}, {s['peft_type']}, sha256 `{s['sha256'][:16]}…`)" for s in adapter.sources
    ]
    lines += _rank_lines({m: d.rank for m, d in adapter.deltas.items()}, adapter.per_module_error)
    lines += _search_lines(adapter.search)
    lines += [f"- note: {n}" for n in adapter.notes]
    if adapter.evaluation:
        from adapterfuse.harness import results_table

        lines += ["", "## Harness results", "", results_table(adapter.evaluation)]
    return tuple(lines)


def _worst_module(per_module_error: dict[str, float]) -> str:
    if not per_module_error:
        return "none"
    module = max(sorted(per_module_error), key=per_module_error.__getitem__)
    return f"`{module}` {per_module_error[module]:.3e}"


def _rank_lines(ranks: dict[str, int], per_module: dict[str, float]) -> list[str]:
    """A table of every module's rank and relative truncation error."""
    if not ranks:
        return []
    out = ["", "## Rank and truncation error per module", "", "| module | rank | relative error |", "|---|---|---|"]
    return out + [f"| `{m}` | {r} | {per_module.get(m, 0.0):.3e} |" for m, r in sorted(ranks.items())]


def _search_lines(search: dict[str, Any]) -> list[str]:
    """Card lines for what validation chose (λ grid, soup order, learned weights)."""
    out: list[str] = []
    lam = search.get("lambda_search")
    if lam:
        pairs = ", ".join(f"{g:g}: {s:.4f}" for g, s in zip(lam["grid"], lam["scores"], strict=True))
        out += ["", "## λ search (validation average score)", "", f"- {pairs}; chosen λ = {lam['chosen']:g}"]
    soup = search.get("soup")
    if soup:
        out += ["", "## Greedy soup", "", f"- kept: {', '.join(soup['kept'])}"]
        out += [
            f"- `{c['name']}`: alone {c['alone']:.4f}, soup with it "
            f"{'—' if c['with'] is None else format(c['with'], '.4f')}, {'kept' if c['kept'] else 'dropped'}"
            for c in soup["candidates"]
        ]
    learned = search.get("learned")
    if learned:
        out += [
            "",
            f"## Learned weights ({learned['mode']})",
            "",
            f"- validation loss: uniform {learned['loss_uniform']:.4f} -> learned {learned['loss']:.4f}",
        ]
        out += [f"- `{n}`: {_shown(w)}" for n, w in learned["weights"].items()]
    return out


def _shown(weight: float | dict[str, float]) -> str:
    """A learned weight (or per-layer weights) for the card."""
    if isinstance(weight, dict):
        return ", ".join(f"layer {k}: {v:.4f}" for k, v in weight.items())
    return f"{weight:.4f}"
