"""What a recipe run will do, before it does it: the plan ``--dry-run`` prints, and the numbered steps a run logs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from adapterfuse.recipe.checks import check_expert_headers, check_recipe
from adapterfuse.recipe.resume import finished_results
from adapterfuse.recipe.schema import GUARD_FALLBACKS, Recipe


def plan(recipe: Recipe, out: str | Path) -> list[str]:
    """What a run would do, step by step, and what is already done; reads no weight.

    Args:
        recipe: a validated recipe.
        out: the run folder (what an earlier run there finished is reported as reused).

    Returns:
        One line per step.

    Raises:
        ConfigError / CompatibilityError: a bad combiner option, or finished experts that disagree.
    """
    out = Path(out)
    check_recipe(recipe)
    lines, finished = [], []
    if recipe.experts.paths:
        lines += [f"expert {p}: given" for p in recipe.experts.paths]
        finished = [Path(p) for p in recipe.experts.paths if Path(p).is_dir()]
    for _, name, cfg in recipe.trained_experts():
        folder = recipe.experts_dir(out) / name
        done = (folder / "adapterfuse.json").is_file()
        finished += [folder] if done else []
        lines.append(
            f"expert {name}: {'reuse' if done else 'train'} ({cfg.max_train_examples} examples, "
            f"{cfg.epochs:g} epoch(s), {cfg.method} r={cfg.rank})"
        )
    if finished:
        check_expert_headers(finished)
        lines.append(f"experts on disk: {len(finished)} compatible (one base fingerprint, matching shapes)")
    done = finished_results(out)
    # The run names an expert by its folder (Expert.load's default), one baseline row per expert.
    expert_names = [Path(p).name for p in recipe.experts.paths or []] or [n for _, n, _ in recipe.trained_experts()]
    names = {"zero_shot": ["base zero-shot"], "oracle": ["oracle"], "experts": [f"expert {n}" for n in expert_names]}
    notes = {c.label: f" (flagged inputs to {GUARD_FALLBACKS[c.guard]})" for c in recipe.combiners if c.guard}
    notes.update({c.label: " (distilled into a LoRA student)" for c in recipe.combiners if c.distill})
    for label in [
        *(label for b in recipe.harness.baselines for label in names[b]),
        *(c.label for c in recipe.combiners),
    ]:
        # The run reuses a recorded result only if its settings and the experts' weights still match.
        what = "result on disk (reused if unchanged)" if label in done else "fit and evaluate"
        lines.append(f"predictor {label}: {what}{notes.get(label, '')}")
    if recipe.harness.detector:
        lines.append(f"feature detector: fit and score on {', '.join(recipe.harness.held_out)} (reused if unchanged)")
    for entry in recipe.outputs.push:
        lines.append(f"push {entry.predictor} -> {entry.repo_id} ({'private' if entry.private else 'public'})")
    return lines


class Steps:
    """Numbers a run's steps for its log: every line of step ``i`` of ``n`` starts with ``[i/n]``."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.log, self.done = total, log, 0

    def start(self, message: str) -> None:
        """Begin the next step and say what it does."""
        self.done += 1
        self.say(message)

    def say(self, message: str) -> None:
        """One more line about the current step."""
        self.log(f"[{self.done}/{self.total}] {message}")


def count_steps(recipe: Recipe) -> int:
    """How many steps a run of ``recipe`` logs: each expert (or loading the given ones), each predictor, the report."""
    n = len(recipe.experts.paths) if recipe.experts.paths else len(recipe.trained_experts())
    experts = 1 if recipe.experts.paths else n
    baselines = sum(n if b == "experts" else 1 for b in recipe.harness.baselines)
    return experts + baselines + len(recipe.combiners) + 1
