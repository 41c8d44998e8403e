"""What a recipe file may say: pydantic models that refuse unknown keys and wrong values.

A recipe is checked completely (sections, task names, each combiner's backend and options) by
:func:`load_recipe` before any model or weight is read, so a misspelt key fails in ``--dry-run``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from adapterfuse.backends.base import BACKENDS as CONFIGURED
from adapterfuse.backends.base import backend_config
from adapterfuse.backends.options import MAX_SEED
from adapterfuse.errors import ConfigError
from adapterfuse.io.atomic import SAFE_FOLDER
from adapterfuse.recipe.families import TRAINED_FAMILIES, FamilyOptions
from adapterfuse.tasks.glue import TASKS
from adapterfuse.train.config import TrainConfig

BACKENDS = ("merge", "ensemble", "route", "pe_ensemble", "task_ensemble")
GuardFallback = Literal["base", "mix"]
GUARD_FALLBACKS: dict[str, str] = {"base": "the base", "mix": "every expert merged"}  # each fallback's name
TASKWISE = ("pe_ensemble", "task_ensemble")  # one predictor per task: told each input's task, like the oracle
BASELINES = ("zero_shot", "oracle")  # the default; "experts" (each expert alone, on every task) is asked by name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TaskEntry(_Strict):
    """Per-task caps and overrides (everything optional)."""

    max_train: int | None = Field(None, ge=1, description="training examples (default: the experts' cap)")
    epochs: float | None = Field(None, gt=0, le=100)
    balance_classes: bool | None = None
    max_test: int | None = Field(None, ge=1, description="dev examples evaluated (seeded subset)")


class ExpertsSection(_Strict):
    """How the experts are trained, or which existing ones are used."""

    method: Literal["lora", "adalora"] = "lora"
    rank: int = Field(8, ge=1, le=1024)
    epochs: float = Field(1.0, gt=0, le=100)
    max_train: int | None = Field(2000, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: dict[str, Any] = Field(default_factory=dict, description="any other TrainConfig field")
    paths: list[str] | None = Field(None, min_length=1, description="use these expert folders; train nothing")
    dir: str | None = Field(None, description="where trained experts live (default OUT/experts)")

    @field_validator("train")
    @classmethod
    def _train_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = {"method", "rank", "epochs", "max_train_examples", "seed", "validation_size"}
        clash = sorted(owned & set(value))
        if clash:
            raise ValueError(
                f"experts.train sets {clash}, which the recipe sets elsewhere (experts.method/rank/"
                "epochs/max_train/seeds, harness.validation_size); move them there"
            )
        if value.get("snapshots", 1) != 1:
            raise ValueError(
                "experts.train.snapshots: a recipe expert is one adapter; for several per task use experts.seeds"
            )
        TrainConfig(**value)  # unknown keys and bad values fail here, before anything is loaded
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0 or max(value) > MAX_SEED:
            raise ValueError(f"expected distinct seeds in 0 .. {MAX_SEED}")
        return value


class DistillEntry(_Strict):
    """Distil a fitted ensemble into one LoRA student (per task for a ``task_ensemble``), trained with the
    recipe's expert settings on the tasks' training inputs; the student is the row."""

    max_train: int | None = Field(None, ge=1, description="training inputs per task (default: the experts' cap)")
    epochs: float | None = Field(None, gt=0, le=100, description="default: the experts' epochs")


class CombinerEntry(_Strict):
    """One backend with its options: fitted on the validation split, then evaluated."""

    backend: Literal["merge", "ensemble", "route", "pe_ensemble", "task_ensemble"]
    name: str | None = Field(None, min_length=1, description="its row label (default: derived)")
    members: list[str] | None = Field(None, min_length=1, description="expert names (default: all)")
    options: dict[str, Any] = Field(default_factory=dict, description="validated by the backend's config model")
    guard: GuardFallback | None = Field(
        None,
        description="inputs the run's feature detector flags get the base's answer, or with 'mix' the uniform "
        "merge of every expert's (needs harness.detector)",
    )
    distill: DistillEntry | None = Field(None, description="the row is a LoRA student of the fitted ensemble")

    @field_validator("name")
    @classmethod
    def _not_hidden(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("."):
            raise ValueError("a combiner's name must not start with '.': it also names its folder under OUT/predictors")
        return value

    @field_validator("options")
    @classmethod
    def _backend_options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """The options the backend's own config model accepts, checked by it (as the API and the CLI do)."""
        backend = info.data.get("backend")
        if backend in CONFIGURED:
            if "name" in value:
                raise ValueError("name: a combiner's row label is its entry's 'name', not an option; move it there")
            backend_config(backend, value)
        elif backend == "task_ensemble":
            FamilyOptions(**value)
        return value

    @field_validator("guard")
    @classmethod
    def _guards_what_answers_any_task(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("backend") in TASKWISE:
            raise ValueError(
                "guard: a task_ensemble or pe_ensemble is told each input's task, so no input is out of task; "
                "remove guard, or guard a merge, ensemble or route combiner"
            )
        return value

    @model_validator(mode="after")
    def _distils_an_ensemble(self) -> CombinerEntry:
        pooled = self.backend == "task_ensemble" and self.options.get("family") in TRAINED_FAMILIES
        if self.distill is not None and not (self.backend == "ensemble" or pooled):
            raise ValueError(
                f"distill: the teacher must be an ensemble; got backend {self.backend!r}; use backend 'ensemble', "
                f"or 'task_ensemble' with a family of trained members ({', '.join(TRAINED_FAMILIES)})"
            )
        if self.distill is not None and self.guard is not None:
            raise ValueError("distill: a distilled student is not guarded; remove guard or distill")
        return self

    def backend_options(self) -> dict[str, Any]:
        """The options a merge, ensemble or route combiner's config is built from: its predictor is named
        after the entry's label."""
        model = CONFIGURED[self.backend][0]
        return {**self.options, "name": self.label} if "name" in model.model_fields else dict(self.options)

    def pe_parts(self) -> tuple[str, int, dict[str, Any]]:
        """A ``pe_ensemble`` entry's kind, K and the kind's own options (kind and K default to
        ``batchensemble`` and 4)."""
        opts = dict(self.options)
        return opts.pop("kind", "batchensemble"), opts.pop("members", 4), opts

    @property
    def label(self) -> str:
        """The row label of this combiner in tables and plots."""
        if self.name:
            return self.name
        main = {
            "merge": "method",
            "ensemble": "pooling",
            "route": "router",
            "pe_ensemble": "kind",
            "task_ensemble": "family",
        }[self.backend]
        value = self.options.get(main)
        return f"{self.backend} {value}" if value is not None else self.backend


class HarnessSection(_Strict):
    """Which splits and how many examples the comparison uses."""

    validation_size: int = Field(200, ge=1, description="examples carved from train for validation")
    validation_per_task: int = Field(100, ge=1, description="validation examples each combiner fits on")
    max_test: int | None = Field(None, ge=1, description="dev examples per task (default: all)")
    baselines: list[Literal["zero_shot", "oracle", "experts"]] = Field(
        default_factory=lambda: list(BASELINES),
        description="reference rows: zero_shot, oracle, experts (each expert alone, on every task)",
    )
    held_out: list[str] = Field(
        default_factory=list,
        description="tasks no expert trained on: every predictor is also scored on their dev sets, apart",
    )
    max_held_out: int | None = Field(1000, ge=1, description="dev examples per held-out task (seeded subset)")
    detector: bool = Field(
        False, description="also fit the feature detector on the tasks' inputs and report its held-out AUROC"
    )

    @field_validator("held_out")
    @classmethod
    def _known_held_out(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; expected names from {sorted(TASKS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"expected distinct task names, got {value}")
        return value


class PushEntry(_Strict):
    """Push one saved predictor (a merged adapter) to the Hub."""

    predictor: str
    repo_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    private: bool = True
    overwrite: bool = Field(False, description="replace files an earlier push of another folder left in the repo")
    endpoint: str | None = None


PlotMetric = Literal["score", "nll", "ece", "brier"]
"""What a run's cost plot can show: the average score, or a task metric averaged over the tasks."""


class OutputsSection(_Strict):
    """What is kept besides the results: saved predictors, Hub pushes, plots."""

    save: list[str] = Field(default_factory=list, description="predictor labels saved under OUT/predictors")
    push: list[PushEntry] = Field(default_factory=list)
    plots: bool = True
    plot_metric: PlotMetric = Field(
        "score", description="the cost plot's y axis: the average score, or NLL, ECE or Brier averaged over tasks"
    )


class Recipe(_Strict):
    """A whole recipe file."""

    name: str = Field(min_length=1)
    description: str = ""
    base: str | None = Field(None, description="Hub id, folder or .gguf (default: SmolLM2-135M-Instruct)")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="where the base runs: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps",
    )
    tasks: dict[str, TaskEntry] = Field(min_length=1)
    experts: ExpertsSection = Field(default_factory=ExpertsSection)
    combiners: list[CombinerEntry] = Field(default_factory=list)
    harness: HarnessSection = Field(default_factory=HarnessSection)
    outputs: OutputsSection = Field(default_factory=OutputsSection)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not SAFE_FOLDER.fullmatch(value):
            raise ValueError(
                "a recipe's name is its run folder under runs/, so it must be a plain file name (letters, digits, "
                "'.', '_' and '-', not starting with '.')"
            )
        return value

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: dict[str, TaskEntry]) -> dict[str, TaskEntry]:
        unknown = sorted(set(value) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; expected names from {sorted(TASKS)}")
        return value

    @model_validator(mode="after")
    def _labels(self) -> Recipe:
        both = sorted(set(self.harness.held_out) & set(self.tasks))
        if both:
            raise ValueError(
                f"harness.held_out: {both} also in tasks; a held-out task has no expert, so remove it from one of them"
            )
        if self.harness.detector and not self.harness.held_out:
            raise ValueError("harness.detector: is measured on held-out tasks, but held_out is empty; add e.g. [qnli]")
        guarded = [c.label for c in self.combiners if c.guard]
        if guarded and not self.harness.detector:
            raise ValueError(f"combiners {guarded}: guard needs the run's feature detector; set harness.detector: true")
        labels = [c.label for c in self.combiners]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"combiner labels {twice} appear twice; give each a distinct 'name'")
        # Checked here, not after an hour of fitting: what can be saved, and that only merges push.
        savable = {c.label for c in self.combiners if c.backend not in TASKWISE} | {"oracle"}
        for wanted in self.outputs.save:
            if wanted not in savable:
                raise ValueError(
                    f"outputs.save: predictor {wanted!r} is not a savable combiner of this recipe "
                    f"(pe_ensemble and task_ensemble members are kept in the run folder already); expected one of "
                    f"{sorted(savable)}"
                )
        merges = {c.label for c in self.combiners if c.backend == "merge" and c.guard is None}
        for entry in self.outputs.push:
            if entry.predictor not in merges:
                raise ValueError(
                    f"outputs.push: predictor {entry.predictor!r} is not a merge combiner of this recipe "
                    f"(only a merged adapter is pushed); expected one of {sorted(merges)}"
                )
        return self

    def experts_dir(self, out: Path) -> Path:
        """The folder the recipe's trained experts live in (``experts.dir``, default ``OUT/experts``)."""
        return Path(self.experts.dir) if self.experts.dir else out / "experts"

    def trained_experts(self) -> list[tuple[str, str, TrainConfig]]:
        """``(task, expert name, its training config)`` for every expert the recipe trains, in order.

        Names are ``task-method-rRANK-sSEED``; empty when ``experts.paths`` gives the experts instead.
        """
        if self.experts.paths:
            return []
        configs = [(task, self.train_config(task, seed)) for task in self.tasks for seed in self.experts.seeds]
        return [(task, expert_name(task, c), c) for task, c in configs]

    def train_config(self, task: str, seed: int) -> TrainConfig:
        """The training configuration of ``task``'s expert with ``seed``."""
        entry, ex = self.tasks[task], self.experts
        fields: dict[str, Any] = {
            **ex.train,
            "method": ex.method,
            "rank": ex.rank,
            "seed": seed,
            "epochs": entry.epochs or ex.epochs,
            "validation_size": self.harness.validation_size,
            "max_train_examples": entry.max_train or ex.max_train,
        }
        if entry.balance_classes is not None:
            fields["balance_classes"] = entry.balance_classes
        return TrainConfig(**fields)


def expert_name(task: str, config: TrainConfig) -> str:
    """The folder name of a recipe-trained expert: ``task-method-rRANK-sSEED``."""
    return f"{task}-{config.method}-r{config.rank}-s{config.seed}"


class _Yaml12Loader(yaml.SafeLoader):
    """YAML as version 1.2 reads booleans: only true/false. YAML 1.1 (PyYAML's default) also reads ``on``,
    ``off``, ``yes`` and ``no`` as booleans, which would turn the routing option ``on: fields`` into
    ``True: fields``."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (no model, data or weight is touched).

    Args:
        path: a ``.yaml`` file.

    Returns:
        The validated :class:`Recipe` (combiner options are checked by
        :func:`adapterfuse.recipe.checks.check_recipe`).

    Raises:
        ConfigError: a missing or unparsable file, or the first invalid key or value, named by its path
            in the file (e.g. ``combiners.2.backend``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path}: no such file; expected a YAML recipe (see recipes/README.md)")
    try:
        raw = yaml.load(path.read_text(), Loader=_Yaml12Loader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Recipe(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"{x}: " if i == len(err["loc"]) - 1 else f"{x}." for i, x in enumerate(err["loc"]))
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        raise ConfigError(f"recipe {path}: {where}{err['msg'].removeprefix('Value error, ')}{got}") from None
