"""Model cards the Hub indexes: YAML metadata built with ``huggingface_hub``'s ``ModelCardData``, then Markdown.

Every saved or pushed adapter carries one (``README.md``). Its metadata gives the licence, the base model and the
``base_model:adapter:<id>`` tag (the Hub lists the adapter under its base with it), ``library_name`` (``peft`` for
an adapter folder, ``transformers`` for a full model), the datasets, the pipeline tag, and the harness scores as
``model-index`` results. The body says what the adapter is, how it was made (the exact command, or the settings
of a Python call) and how to load it from where it lives (its Hub repo or its folder).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LICENSE = "apache-2.0"
GLUE_DATASET = "nyu-mll/glue"
PIPELINE_TAG = "text-generation"  # the adapters answer through a causal LM's next-token distribution
# A Hub model id: what `base_model` metadata and the `base_model:adapter:` tag accept (a local path is not one).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PEFT_NAMES = {"LORA": "LoRA", "ADALORA": "AdaLoRA"}
# The temporary sibling io.atomic.atomic_dir writes into before renaming it to its target.
_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-[A-Za-z0-9_-]+$")  # see io.atomic: .<out>.tmp-<pid>-<random>


@dataclass(frozen=True)
class Score:
    """One harness number, shown on the card and listed as a ``model-index`` result.

    Attributes:
        task: our task name (``sst2``, ``mnli_mm`` …).
        metric: the metric (``accuracy``, ``f1``, ``mcc``, ``pearson``, ``spearman``).
        value: its value.
    """

    task: str
    metric: str
    value: float


@dataclass(frozen=True)
class CardSpec:
    """What a card says.

    Attributes:
        title: the heading.
        summary: one or two sentences saying what the folder holds.
        base_model: the base's spec (a Hub id goes into the metadata; a local path is only named in the body).
        library_name: ``peft`` for an adapter folder, ``transformers`` for a full model.
        load_from: the Hub repo id or folder the load snippet reads.
        tags: extra tags (``adapterfuse`` and the base-model tag are added).
        tasks: the tasks it was trained or merged on (their datasets go into the metadata).
        scores: harness scores on the test split (GLUE dev), listed as ``model-index`` results.
        facts: Markdown bullet lines (without the leading ``- ``) about the adapter.
        sections: further Markdown lines (method details, searches), shown before the load snippet.
        command: the exact command that produced it; ``None`` when it was made through the Python API.
        recipe: the settings of that Python call, shown as JSON when there is no command.
        license: the licence identifier (the Hub's lower-case SPDX spelling).
    """

    title: str
    summary: str
    base_model: str | None
    library_name: Literal["peft", "transformers"]
    load_from: str
    tags: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    scores: tuple[Score, ...] = ()
    facts: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    command: str | None = None
    recipe: Mapping[str, Any] = field(default_factory=dict)
    license: str = LICENSE


def adapter_phrase(peft_type: str) -> str:
    """``"A LoRA adapter"`` or ``"An AdaLoRA adapter"``: the PEFT type as its authors spell it, with its article.

    Args:
        peft_type: PEFT's ``peft_type`` (``LORA``, ``ADALORA`` …).

    Returns:
        The phrase, capitalised to start a sentence.
    """
    name = _PEFT_NAMES.get(peft_type.upper(), peft_type or "PEFT")
    return f"{'An' if name[:1].lower() in 'aeiou' else 'A'} {name} adapter"


def final_folder(path: str | Path) -> Path:
    """The folder a card will live in: ``path``, or the target of an :func:`~adapterfuse.io.atomic.atomic_dir` temp.

    Args:
        path: where the files are being written.

    Returns:
        The folder the files end up in once the write completes.
    """
    path = Path(path)
    match = _ATOMIC_TMP.match(path.name)
    return path.with_name(match["name"]) if match else path


def invocation() -> str | None:
    """The command line of this process when it is the ``adapterfuse`` CLI, else ``None``.

    Returns:
        ``adapterfuse <arguments>`` quoted for a POSIX shell, or ``None`` (the Python API, a test runner).
    """
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if program is None:
        return None
    # The console script, or `python -m adapterfuse.cli` (whose argv[0] is adapterfuse/cli/__main__.py).
    if program.name == "adapterfuse" or (program.name == "__main__.py" and "adapterfuse" in program.parts[-3:]):
        return shlex.join(["adapterfuse", *sys.argv[1:]])
    return None


def scores_from(per_task: Mapping[str, Mapping[str, Any]]) -> tuple[Score, ...]:
    """Card scores from ``{task: {metric: value, …}}`` (the harness's and the experts' layout).

    Only each task's official metrics are kept (counts, timings and the averaged ``score`` are not results).

    Args:
        per_task: metrics per task.

    Returns:
        The scores, in task order, then the task's metric order.
    """
    from adapterfuse.tasks.glue import TASKS

    out: list[Score] = []
    for task, metrics in per_task.items():
        names = TASKS[task].metrics if task in TASKS else tuple(sorted(metrics))
        out += [
            Score(task, name, float(metrics[name]))
            for name in names
            if isinstance(metrics.get(name), (int, float)) and not isinstance(metrics.get(name), bool)
        ]
    return tuple(out)


def build_card(spec: CardSpec) -> str:
    """The card's text: YAML metadata (``ModelCardData``) then the Markdown body.

    Args:
        spec: what the card says.

    Returns:
        The content of ``README.md``, which ``huggingface_hub.ModelCard`` parses back.
    """
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = spec.base_model if spec.base_model and _HUB_ID.match(spec.base_model) else None
    tags = ["adapterfuse", *spec.tags]
    if hub_base and spec.library_name == "peft":
        tags.append(f"base_model:adapter:{hub_base}")
    data = ModelCardData(
        license=spec.license,
        base_model=hub_base,
        library_name=spec.library_name,
        pipeline_tag=PIPELINE_TAG,
        tags=list(dict.fromkeys(tags)),
        datasets=[GLUE_DATASET] if _glue_tasks(spec.tasks) else None,
        model_name=spec.title if spec.scores else None,
        eval_results=_eval_results(spec.scores) or None,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(_body(spec))))


def _glue_tasks(tasks: Iterable[str]) -> list[str]:
    from adapterfuse.tasks.glue import TASKS

    return [t for t in tasks if t in TASKS]


def _eval_results(scores: Sequence[Score]) -> list[Any]:
    """``model-index`` results: GLUE tasks name their ``nyu-mll/glue`` config and the dev split we test on."""
    from huggingface_hub import EvalResult

    from adapterfuse.tasks.glue import TASKS

    out = []
    for score in scores:
        task = TASKS.get(score.task)
        out.append(
            EvalResult(
                task_type="text-classification",
                dataset_type=GLUE_DATASET if task else score.task,
                dataset_name=f"GLUE {task.folder}" if task else score.task,
                dataset_config=task.hub_config if task else None,
                dataset_split=task.hub_test_split if task else None,
                metric_type=score.metric,
                metric_name=score.metric,
                metric_value=round(score.value, 6),
            )
        )
    return out


def _body(spec: CardSpec) -> list[str]:
    lines = [f"# {spec.title}", "", spec.summary, ""]
    lines += [f"- {fact}" for fact in spec.facts]
    if spec.scores:
        lines += [
            "",
            "## Scores (GLUE dev, the harness's test split)",
            "",
            "| task | metric | value |",
            "|---|---|---|",
        ]
        lines += [f"| {s.task} | {s.metric} | {s.value:.4f} |" for s in spec.scores]
    lines += list(spec.sections)
    lines += ["", "## How it was made", ""]
    if spec.command:
        lines += ["```bash", spec.command, "```"]
    else:
        lines += ["Through the adapterfuse Python API, with these settings:", "", "```json"]
        lines += [json.dumps(dict(spec.recipe), indent=2, sort_keys=True, default=str), "```"]
    lines += ["", "## Load it", "", "```python", *_load_snippet(spec), "```", ""]
    return lines


def _load_snippet(spec: CardSpec) -> list[str]:
    where = repr(spec.load_from)
    if spec.library_name == "transformers":
        return [
            "from transformers import AutoModelForCausalLM",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({where})",
        ]
    return [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base_model = AutoModelForCausalLM.from_pretrained({spec.base_model!r})",
        f"model = PeftModel.from_pretrained(base_model, {where})",
    ]
