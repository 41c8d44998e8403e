"""The model card of a merged adapter, written from its ``adapterfuse.json`` content.

The card says what the folder holds: the sources, the method and its parameters, the rank and the
truncation error of every module (so a reader sees what a rank policy kept), what validation chose, and
how to load it.
"""

from __future__ import annotations

from typing import Any


def merged_card(meta: dict[str, Any], full: bool = False) -> str:
    """A Markdown model card naming the sources, method, parameters, ranks and errors.

    Args:
        meta: the merged adapter's metadata (:meth:`~adapterfuse.backends.merge.adapter.MergedAdapter.metadata`).
        full: whether the folder holds the merged full model rather than the adapter.

    Returns:
        The card's text.
    """
    params = ", ".join(f"{k}={v}" for k, v in sorted(meta["params"].items()) if v is not None)
    base, sources, error = meta["base"], meta["sources"], meta["truncation_error"]
    fp = str(base.get("fingerprint"))
    lines = [
        "---",
        f"library_name: {'transformers' if full else 'peft'}",
        f"base_model: {base.get('spec')}",
        "tags: [adapterfuse, lora, merge]",
        "---",
        "",
        f"# merged adapter ({meta['method']})",
        "",
        f"{'A full model with' if full else 'A LoRA adapter holding'} the merge of {len(sources)} "
        f"expert{'s' * (len(sources) != 1)} by `{meta['method']}` (maths: `{meta['merged_with']}`), "
        "made with adapterfuse.",
        "",
        f"- base: `{base.get('spec')}` (fingerprint `{fp[:23]}…`)",
        f"- parameters: {params}",
        f"- adapter parameters: {meta['adapter_params']:,}",
        f"- relative truncation error (Frobenius, all modules): {error['overall']:.3e}",
        f"- worst module: {_worst_module(error['per_module'])}",
        "",
        "## Sources",
        "",
    ]
    lines += [f"- `{s['name']}` (task {s['task']}, {s['peft_type']}, sha256 `{s['sha256'][:16]}…`)" for s in sources]
    lines += _rank_lines(meta.get("ranks", {}), error["per_module"])
    lines += _search_lines(meta["search"])
    lines += [f"- note: {n}" for n in meta["notes"]]
    usage = (
        ("from transformers import AutoModelForCausalLM", "model = AutoModelForCausalLM.from_pretrained('PATH')")
        if full
        else ("from peft import PeftModel", "model = PeftModel.from_pretrained(base_model, 'PATH')")
    )
    if meta["evaluation"]:
        from adapterfuse.harness import results_table

        lines += ["", "## Harness results", "", results_table(meta["evaluation"])]
    lines += ["", "Load it with:", "", "```python", *usage, "```", ""]
    return "\n".join(lines)


def _worst_module(per_module: dict[str, float]) -> str:
    if not per_module:
        return "none"
    module = max(sorted(per_module), key=per_module.__getitem__)
    return f"`{module}` {per_module[module]:.3e}"


def _rank_lines(ranks: dict[str, int], per_module: dict[str, float]) -> list[str]:
    """A table of every module's rank and relative truncation error."""
    if not ranks:
        return []
    out = ["", "## Rank and truncation error per module", "", "| module | rank | relative error |", "|---|---|---|"]
    return out + [f"| `{m}` | {r} | {per_module.get(m, 0.0):.3e} |" for m, r in ranks.items()]


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
