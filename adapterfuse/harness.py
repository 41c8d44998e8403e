"""The multi-task harness: evaluate any predictor over tasks -> per-task metrics, average, cost.

Also the two reference predictors every comparison table carries: the base model zero-shot and the
oracle (each task answered by its own task's expert), one expert alone as a predictor, and their loaders.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapterfuse.base import BaseModel
from adapterfuse.detection import probs_and_uncertainty
from adapterfuse.distributed import map_rows
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert, attach_experts, load_member
from adapterfuse.head import DEFAULT_MAX_LENGTH, predict_proba, predictions
from adapterfuse.io.atomic import atomic_dir
from adapterfuse.io.manifest import Manifest, member_entries, write_manifest
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import Cost, Predictor
from adapterfuse.progress import bar
from adapterfuse.tasks.glue import get_task
from adapterfuse.tasks.metrics import compute_metrics
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec
from adapterfuse.uncertainty import ECE_BINS, reliability, uncertainty_metrics


def score_examples(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    examples: Sequence[Example],
    config: Any = None,
) -> dict[str, float]:
    """The task's metrics of ``model`` on ``examples`` (batch size, autocast, length from ``config``)."""
    probs = predict_proba(
        model,
        tokenizer,
        task,
        examples,
        batch_size=getattr(config, "eval_batch_size", 32),
        autocast=getattr(config, "autocast", True),
        max_length=getattr(config, "max_length", DEFAULT_MAX_LENGTH),
    )
    return compute_metrics(task.metrics, predictions(task, probs), [e.label for e in examples])


def adapter_params(experts: Sequence[Expert]) -> int:
    """Adapter parameters stored by a set of experts."""
    return sum(t.numel() for e in experts for t in e.state_dict.values())


class ModelPredictor:
    """A predictor that is one (possibly adapted) model read through :mod:`adapterfuse.head`.

    Args:
        name: shown in tables.
        model: the model.
        tokenizer: its tokenizer.
        stored_params: adapter parameters it keeps (for :class:`Cost`).
        batch_size, autocast, max_length: scoring settings.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        stored_params: int = 0,
        batch_size: int = 32,
        autocast: bool = True,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.stored_params = stored_params
        self.batch_size, self.autocast, self.max_length = batch_size, autocast, max_length

    def prepare(self, task: TaskSpec) -> None:
        """Hook run before each task's batch (the oracle switches adapters here)."""

    def predict_proba(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """``[n, n_labels]`` probabilities over the task's label words."""
        self.prepare(task)
        return predict_proba(self.model, self.tokenizer, task, batch, self.batch_size, self.autocast, self.max_length)

    def cost(self) -> Cost:
        """One base forward pass per input, plus whatever adapters it stores (fp32)."""
        return Cost(stored_params=self.stored_params, forward_passes=1.0, memory_bytes=4 * self.stored_params)

    def scoring(self) -> dict[str, Any]:
        """The scoring settings, as saved in a manifest."""
        return {"batch_size": self.batch_size, "autocast": self.autocast, "max_length": self.max_length}

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """A bare model has no saved form: its subclasses (zero-shot, oracle, expert, merged) save.

        Raises:
            ConfigError: always, naming what to save instead.
        """
        raise ConfigError(
            f"predictor {self.name!r}: a model read as is has no saved form; save the expert "
            "(ExpertPredictor) or the merged adapter (MergedAdapter.save_pretrained) it reads instead"
        )


class ZeroShotPredictor(ModelPredictor):
    """The base model with no adapter: the floor every backend must beat."""

    def __init__(self, base: BaseModel, **kwargs: Any) -> None:
        super().__init__("base zero-shot", base.model, base.tokenizer, **kwargs)
        self.base = base

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write only ``manifest.json`` (the base has no weights of its own to save; the manifest names it).

        Raises:
            OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        """
        with atomic_dir(path, overwrite) as tmp:
            write_manifest(tmp, "zero_shot", self.name, {"scoring": self.scoring()}, self.base.record())


class ExpertPredictor(ModelPredictor):
    """One expert on the base, as a predictor; it saves as the expert's own (PEFT) folder.

    Args:
        base: the frozen base (a copy carries the adapter).
        expert: the expert.
        name: shown in tables (default: the expert's name).
        **kwargs: scoring settings of :class:`ModelPredictor`.
    """

    def __init__(self, base: BaseModel, expert: Expert, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(
            name or expert.name,
            expert.attach(base.model),
            base.tokenizer,
            stored_params=adapter_params([expert]),
            **kwargs,
        )
        self.expert = expert

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the expert folder (plain PEFT plus ``adapterfuse.json``) and ``manifest.json``.

        Raises:
            OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        """
        with atomic_dir(path, overwrite) as tmp:
            self.expert.write_into(tmp, self.name, {"scoring": self.scoring()})


class OraclePredictor(ModelPredictor):
    """Each task answered by its own task's expert: the reference the backends are normalised by.

    Args:
        base: the frozen base.
        library: experts; the first expert of each task is used for that task.
    """

    def __init__(self, base: BaseModel, library: ExpertLibrary, **kwargs: Any) -> None:
        self.by_task = {task: experts[0] for task, experts in library.by_task().items() if task}
        experts = list(self.by_task.values())
        if not experts:
            raise ConfigError("oracle: no expert records its task; expected experts trained by adapterfuse")
        # Adapters named by position: an expert's own name may hold characters PEFT refuses ('.').
        self.adapters = {task: f"expert{i}" for i, task in enumerate(self.by_task)}
        model = attach_experts(base.model, experts, list(self.adapters.values()))
        super().__init__("oracle", model, base.tokenizer, stored_params=adapter_params(experts), **kwargs)
        self.base = base

    def prepare(self, task: TaskSpec) -> None:
        if task.train_task not in self.adapters:
            raise ConfigError(f"oracle: no expert for task {task.name!r}; have experts for {sorted(self.by_task)}")
        self.model.set_adapter(self.adapters[task.train_task])

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write every expert in a subfolder and ``manifest.json`` mapping tasks to them.

        Raises:
            OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        """
        with atomic_dir(path, overwrite) as tmp:
            for expert in self.by_task.values():
                (tmp / expert.name).mkdir()
                expert.write_into(tmp / expert.name)
            tasks = [{"task": t, "name": e.name, "folder": e.name} for t, e in self.by_task.items()]
            write_manifest(tmp, "oracle", self.name, {"tasks": tasks, "scoring": self.scoring()}, self.base.record())


def load_model_predictor(folder: Path, manifest: Manifest, base: BaseModel) -> ModelPredictor:
    """Rebuild a saved zero-shot, oracle or expert predictor (see :func:`adapterfuse.load_predictor`).

    Args:
        folder: the saved folder (its manifest already checked).
        manifest: its manifest.
        base: the base to run on.

    Returns:
        The predictor, with the saved name and scoring settings.

    Raises:
        ExpertError: an expert folder that does not load.
        ConfigError: a manifest of another kind.
    """
    scoring = dict(manifest.settings.get("scoring", {}))
    if manifest.kind == "zero_shot":
        predictor: ModelPredictor = ZeroShotPredictor(base, **scoring)
    elif manifest.kind == "oracle":
        entries = member_entries(folder, manifest, "tasks")
        experts = [load_member(folder / e["folder"], e, manifest) for e in entries]
        predictor = OraclePredictor(base, ExpertLibrary(experts, base.fingerprint), **scoring)
    elif manifest.kind == "expert":
        predictor = ExpertPredictor(base, Expert.load(folder, verify=False), **scoring)  # checked by the caller
    else:
        raise ConfigError(f"load_model_predictor: kind {manifest.kind!r}, expected zero_shot, oracle or expert")
    predictor.name = manifest.name
    return predictor


def evaluate(
    predictor: Predictor,
    data: Sequence[TaskData],
    split: str = "test",
    max_examples: int | None = None,
    entropies: bool = False,
) -> dict[str, Any]:
    """Evaluate a predictor over tasks.

    Under a multi-process launch the inputs are split over the processes and every process gets the
    whole result (see :mod:`adapterfuse.distributed`).

    Args:
        predictor: anything with ``predict_proba`` and ``cost``.
        data: the tasks' splits.
        split: ``"test"`` (GLUE dev) or ``"validation"``.
        max_examples: evaluate at most this many examples per task (the first ones).
        entropies: also return each input's uncertainty scores (see
            :func:`~adapterfuse.detection.probs_and_uncertainty`: the predictive entropy, and the members'
            mutual information for an ensemble), divided by ``log(n_labels)`` so that tasks with 2 and 6
            label words share one ``[0, 1]`` scale (what out-of-task detection reads).

    Returns:
        ``{"predictor", "tasks": {task: metrics + nll, brier, ece + n + seconds + examples_per_s}, "average",
        "examples_per_s", "cost", "ece_bins"}``; ``average`` is the mean of the per-task ``score``; ``ece``
        (classification tasks) uses ``ece_bins`` equal-mass bins, whose reliability diagrams are in
        ``"reliability": {task: {"confidence", "accuracy", "count"}}`` (for classification tasks). With
        ``entropies``, also ``"entropies": {task: {score name: [n] tensor}}``.

    Raises:
        ConfigError: for an unknown split or no tasks.
    """
    if split not in ("test", "validation", "train"):
        raise ConfigError(f"split {split!r}: expected 'test', 'validation' or 'train'")
    if not data:
        raise ConfigError("evaluate: expected at least one task, got none")
    tasks: dict[str, dict[str, float]] = {}
    per_input: dict[str, dict[str, torch.Tensor]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    total_n, total_s = 0, 0.0
    for td in bar(data, f"evaluate {predictor.name}", unit="task"):
        examples = getattr(td, split)[:max_examples]
        t0 = time.perf_counter()
        if entropies:
            probs, per_input[td.task.name] = probs_and_uncertainty(predictor, td.task, examples)
        else:
            probs = map_rows(partial(predictor.predict_proba, td.task), examples)
        seconds = time.perf_counter() - t0
        labels = [e.label for e in examples]
        metrics = compute_metrics(td.task.metrics, predictions(td.task, probs), labels)
        tasks[td.task.name] = {
            **metrics,
            **uncertainty_metrics(td.task, probs, labels),
            "n": len(examples),
            "seconds": round(seconds, 3),
            "examples_per_s": round(len(examples) / max(seconds, 1e-9), 2),
        }
        total_n, total_s = total_n + len(examples), total_s + seconds
        if not td.task.regression:
            curves[td.task.name] = reliability(probs, labels)
    result = {
        "predictor": predictor.name,
        "split": split,
        "tasks": tasks,
        "average": statistics.fmean(t["score"] for t in tasks.values()),
        "examples_per_s": round(total_n / max(total_s, 1e-9), 2),
        "cost": predictor.cost().as_dict(),
        "ece_bins": ECE_BINS,
        **({"reliability": curves} if curves else {}),
    }
    return {**result, "entropies": per_input} if entropies else result


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per predictor, each task's metrics, the average and the cost."""
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    metric_cols = []
    for t in tasks:  # a task's official metrics, plus their mean where GLUE averages several
        names = get_task(t).metrics
        metric_cols += [(t, m) for m in names] + ([(t, "score")] if len(names) > 1 else [])
    head = ["predictor", *[f"{t} {m}" for t, m in metric_cols], "average", "ex/s", "adapter params", "passes/input"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["predictor"]]
        cells += [f"{r['tasks'][t][m]:.3f}" if t in r["tasks"] else "—" for t, m in metric_cols]
        cost = r["cost"]
        cells += [
            f"{r['average']:.3f}",
            f"{r['examples_per_s']:.1f}",
            f"{cost['stored_params']:,}",
            f"{cost['forward_passes']:g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def uncertainty_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of how sure each predictor is: per task ``NLL / ECE / Brier`` (lower is better).

    Regression tasks have no ECE (shown as ``—``); ECE uses the equal-mass bins the results record.
    """
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    bins = next((r["ece_bins"] for r in results if "ece_bins" in r), ECE_BINS)
    head = ["predictor", *[f"{t} NLL / ECE / Brier" for t in tasks], "mean NLL"]
    lines = [f"ECE over {bins} equal-mass bins; lower is better throughout.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells, nlls = [r["predictor"]], []
        for t in tasks:
            m = r["tasks"].get(t, {})
            if "nll" not in m:
                cells.append("—")
                continue
            nlls.append(m["nll"])
            ece_cell = f"{m['ece']:.3f}" if "ece" in m else "—"
            cells.append(f"{m['nll']:.3f} / {ece_cell} / {m['brier']:.3f}")
        cells.append(f"{statistics.fmean(nlls):.3f}" if nlls else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
