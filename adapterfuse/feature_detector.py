"""Out-of-task detection from the input itself: how far it lies from every input the experts were trained on.

A predictor's uncertainty (:mod:`adapterfuse.detection`) is read off its answer over the task's label
words, and an input of a task no expert knows can be answered with confidence. :class:`FeatureDetector`
reads the input instead: the frozen base's mean-pooled hidden state of one layer (the features a router
sees, :class:`~adapterfuse.backends.route.features.FeatureExtractor`), by default of each raw input field
on its own, so that no task's template gives it away and a pair's two fields are not blurred into one
mean. Its score is the cosine distance to the ``k``-th nearest in-task training input (Sun et al. 2022,
https://arxiv.org/abs/2204.06507). Rows are scaled to length 1 first: the length of a mean-pooled state
follows the length of the text, and a distance that reads it (Mahalanobis to the task means, say) ranks
long inputs of any task as typical and short in-task ones as strange.
Inputs farther than a chosen share (``accept``) of the in-task validation inputs are flagged, so a
router or an ensemble can abstain on them or hand them to the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adapterfuse.backends.route.features import FeatureExtractor
from adapterfuse.base import BaseModel
from adapterfuse.errors import CompatibilityError, ConfigError, ExpertError
from adapterfuse.io.atomic import atomic_dir, read_manifest, write_json
from adapterfuse.io.manifest import sha256_file
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec
from adapterfuse.uncertainty import auroc

WEIGHTS_FILE = "detector.safetensors"
CONFIG_FILE = "detector.json"
FORMAT_VERSION = 1
KIND = "feature detector"  # the kind detector.json declares
FIELD_SLOTS = 2  # a GLUE input has one or two fields
SCORE_ROWS = 1024  # inputs compared with the whole bank at once: a [1024, bank size] similarity matrix


@dataclass(frozen=True)
class DetectorSpec:
    """What the detector reads of an input.

    Attributes:
        layer: the base's hidden state (0: token embeddings; negative counts from the end, -1: the final one).
        on: ``"each_field"``: each raw input field pooled on its own, the :data:`FIELD_SLOTS` unit rows side
            by side (an absent field is zeros; fields past the last slot join it); ``"fields"``: the raw
            fields joined by newlines, pooled as one text; ``"prompt"``: the task's whole prompt (which names
            the task, so it tells tasks apart by their template rather than by their inputs).
        readout: ``"mean"`` over real tokens, or ``"mean_last"`` (the mean, then the last token's state).
        k: the score is the distance to the ``k``-th nearest in-task training input (1: the nearest).
    """

    layer: int = -1
    on: Literal["each_field", "fields", "prompt"] = "each_field"
    readout: Literal["mean", "mean_last"] = "mean"
    k: int = 1

    def __post_init__(self) -> None:
        hints = get_type_hints(DetectorSpec)
        for name in ("on", "readout"):
            choices = get_args(hints[name])
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{name}: expected one of {', '.join(choices)}, got {getattr(self, name)!r}; pick one of those"
                )
        if self.k < 1:
            raise ConfigError(f"k: expected a neighbour rank >= 1, got {self.k}; 1 is the nearest in-task input")


def check_accept(accept: float) -> float:
    """Return ``accept`` if it is a share in ``(0, 1]``.

    Raises:
        ConfigError: otherwise.
    """
    if not 0 < accept <= 1:
        raise ConfigError(f"accept: expected a share in (0, 1], got {accept}; 0.95 keeps 95% of in-task inputs")
    return accept


def feature_extractor(base: BaseModel, spec: DetectorSpec) -> FeatureExtractor:
    """The extractor of ``spec``'s features, run in fp32 so that a detector scores alike on every device."""
    return FeatureExtractor(base, layer=spec.layer, autocast=False, readout=spec.readout, label="detector features")


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Each row scaled to length 1, fp32: a mean-pooled state's length follows the text's, not its task."""
    return F.normalize(features.float(), dim=1)


def field_text(fields: Sequence[str], slot: int) -> str:
    """The text of one slot of :data:`FIELD_SLOTS`: that field (whitespace collapsed), the last slot with every
    field after it; ``""`` for an absent field."""
    chosen = fields[slot:] if slot == FIELD_SLOTS - 1 else fields[slot : slot + 1]
    return "\n".join(" ".join(f.split()) for f in chosen)


def input_rows(extractor: FeatureExtractor, task: TaskSpec, examples: Sequence[Example], on: str) -> torch.Tensor:
    """The unit-length feature rows a detector compares, ``[n, d]`` (``d`` = :meth:`FeatureDetector.dim`).

    Args:
        extractor: reads the base's hidden state.
        task: the inputs' task (its template is read only with ``on="prompt"``).
        examples: the inputs.
        on: see :class:`DetectorSpec`.
    """
    if on != "each_field":
        return unit_rows(extractor.features(task, examples, on))
    slots = []
    for slot in range(FIELD_SLOTS):
        texts = [field_text(e.fields, slot) for e in examples]
        present = [i for i, text in enumerate(texts) if text]
        rows = torch.zeros(len(examples), extractor.dim)
        if present:
            rows[present] = unit_rows(extractor.encode([texts[i] for i in present]))
        slots.append(rows)
    return unit_rows(torch.cat(slots, dim=1))


def knn_distance(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's cosine distance (1 - cosine similarity) to its ``k``-th nearest row of ``bank``, ``[n]``.

    Args:
        features: ``[n, d]`` the inputs' features.
        bank: ``[m, d]`` the in-task features, rows of length 1 (see :func:`unit_rows`), ``m >= k``.
        k: which neighbour (1: the nearest).
    """
    rows = unit_rows(features)
    kth = [(chunk @ bank.T).topk(k, dim=1).values[:, -1] for chunk in rows.split(SCORE_ROWS)]
    return 1.0 - torch.cat(kth) if kth else torch.empty(0)


class FeatureDetector:
    """Scores inputs by their distance from the in-task inputs it was fitted on; large means out of task.

    Args:
        base: the frozen base the features are read from.
        spec: what is read and which neighbour counts (see :class:`DetectorSpec`).
        tasks: the in-task names.
        bank: ``[m, d]`` the in-task training features, rows of length 1.
        threshold: distances above it are flagged (``None``: not set, see :meth:`fit`).
        accept: the share of in-task validation inputs the threshold keeps.
        extractor: the extractor of ``spec``'s features (default: a new one, see :func:`feature_extractor`).

    Raises:
        ConfigError: a bank that does not match the base's features or has fewer than ``k`` rows.
    """

    def __init__(
        self,
        base: BaseModel,
        spec: DetectorSpec,
        tasks: Sequence[str],
        bank: torch.Tensor,
        threshold: float | None = None,
        accept: float | None = None,
        extractor: FeatureExtractor | None = None,
    ) -> None:
        self.extractor = extractor or feature_extractor(base, spec)
        self.spec = replace(spec, layer=self.extractor.layer)
        if bank.ndim != 2 or bank.shape[1] != self.dim or bank.shape[0] < spec.k:
            raise ConfigError(
                f"feature detector: expected a bank of at least k={spec.k} rows of {self.dim} features "
                f"for this base, got {list(bank.shape)}; fit the detector on this base with more inputs"
            )
        self.base, self.tasks, self.bank = base, list(tasks), bank.float()
        self.threshold, self.accept = threshold, accept

    @classmethod
    def fit(
        cls, base: BaseModel, data: Sequence[TaskData], spec: DetectorSpec | None = None, accept: float = 0.95
    ) -> FeatureDetector:
        """Keep each task's training inputs' features; set the threshold on their validation inputs.

        Args:
            base: the frozen base.
            data: the in-task tasks (``train`` is read, then ``validation`` when there is one).
            spec: what to read (default :class:`DetectorSpec`).
            accept: the share of validation inputs the threshold keeps, in ``(0, 1]``.

        Returns:
            The detector; its ``threshold`` is ``None`` when no task has validation inputs.

        Raises:
            ConfigError: no tasks, fewer training inputs than ``k``, or ``accept`` out of range.
        """
        spec = spec or DetectorSpec()
        check_accept(accept)
        if not data:
            raise ConfigError("feature detector: expected at least one in-task task, got none; name the tasks")
        extractor = feature_extractor(base, spec)
        bank = torch.cat([input_rows(extractor, td.task, td.train, spec.on) for td in data])
        detector = cls(base, spec, [td.task.name for td in data], bank, extractor=extractor)  # its cache is kept
        validation = [detector.score(td.task, td.validation) for td in data if td.validation]
        if validation:
            detector.threshold = float(torch.quantile(torch.cat(validation), accept).item())
            detector.accept = accept
        return detector

    def score(self, task: TaskSpec, examples: Sequence[Example]) -> torch.Tensor:
        """Each input's cosine distance to its ``k``-th nearest in-task training input, ``[n]`` in ``[0, 2]``.

        Args:
            task: the inputs' task (its template is read only with ``on="prompt"``).
            examples: the inputs.
        """
        if not examples:
            return torch.empty(0)
        return knn_distance(input_rows(self.extractor, task, examples, self.spec.on), self.bank, self.spec.k)

    @property
    def dim(self) -> int:
        """The size of a feature row: the base's pooled state, once per field slot with ``on="each_field"``."""
        return self.extractor.dim * (FIELD_SLOTS if self.spec.on == "each_field" else 1)

    def flags(self, task: TaskSpec, examples: Sequence[Example]) -> torch.Tensor:
        """Which inputs lie beyond the threshold (``True``: out of task), bool ``[n]``.

        Raises:
            ConfigError: the detector has no threshold (fitted without validation inputs).
        """
        if self.threshold is None:
            raise ConfigError("feature detector: no threshold; fit it on tasks with validation inputs")
        return self.score(task, examples) > self.threshold

    def settings(self) -> dict[str, Any]:
        """What :meth:`save` writes beside the features (and :meth:`load` checks)."""
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "spec": asdict(self.spec),
            "tasks": self.tasks,
            "threshold": self.threshold,
            "accept": self.accept,
            "base": self.base.record(),
        }

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write ``detector.safetensors`` and ``detector.json`` into ``path``, atomically.

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is false.
            SaveError: the folder could not be written (nothing half-written is left).
        """
        with atomic_dir(path, overwrite) as tmp:
            self.write(tmp)

    def write(self, folder: Path) -> None:
        """Write the detector's two files into an existing ``folder`` (:meth:`save` gives it a temporary one)."""
        save_file({"bank": self.bank.contiguous()}, str(folder / WEIGHTS_FILE))
        record = {**self.settings(), "sha256": sha256_file(folder / WEIGHTS_FILE)}
        write_json(folder / CONFIG_FILE, record)

    @classmethod
    def load(cls, path: str | Path, base: BaseModel) -> FeatureDetector:
        """Read a detector saved by :meth:`save`, for the base it was fitted on.

        Raises:
            ExpertError: a missing, unreadable, incomplete or altered file, or another kind or format version.
            CompatibilityError: the detector was fitted on another base.
        """
        folder = Path(path)
        required = ("spec", "tasks", "threshold", "accept", "base", "sha256")
        record = read_manifest(folder, CONFIG_FILE, KIND, FORMAT_VERSION, required, "FeatureDetector.save")
        weights = folder / WEIGHTS_FILE
        if not weights.is_file() or sha256_file(weights) != record.get("sha256"):
            raise ExpertError(f"feature detector {folder}: {WEIGHTS_FILE} is missing or altered; save it again")
        fitted_on, fingerprint = record["base"].get("spec"), str(record["base"].get("fingerprint"))
        if fingerprint != base.fingerprint:
            raise CompatibilityError(
                f"feature detector {folder}: fitted on base {fitted_on} ({fingerprint[:12]}), got {base.spec} "
                f"({str(base.fingerprint)[:12]}); load the base it was fitted on, or fit it again"
            )
        bank = load_file(str(weights))["bank"]
        return cls(base, DetectorSpec(**record["spec"]), record["tasks"], bank, record["threshold"], record["accept"])


def leave_one_task_out(detector: FeatureDetector, data: Sequence[TaskData]) -> dict[str, float]:
    """How well the detector would catch each in-task task were it unknown: the AUROC of that task's test
    inputs against the other tasks' test inputs, distances taken to the other tasks' training inputs only.

    Needs no held-out task, so it can compare settings without touching one.

    Args:
        detector: a detector fitted on ``data`` (its features are reused).
        data: the in-task tasks, at least two.

    Returns:
        ``{task name: AUROC}``.

    Raises:
        ConfigError: fewer than two tasks.
    """
    if len(data) < 2:
        raise ConfigError(f"leave one task out: expected at least 2 in-task tasks, got {len(data)}; add a task")
    on = detector.spec.on
    rows = {td.task.name: [input_rows(detector.extractor, td.task, s, on) for s in (td.train, td.test)] for td in data}
    found = {}
    for name, (_, left_out) in rows.items():
        others = [pair for other, pair in rows.items() if other != name]
        bank = torch.cat([train for train, _ in others])
        inside = torch.cat([knn_distance(test, bank, detector.spec.k) for _, test in others])
        found[name] = auroc(inside, knn_distance(left_out, bank, detector.spec.k))
    return found


def detection_result(detector: FeatureDetector, data: Sequence[TaskData], away: Sequence[TaskData]) -> dict[str, Any]:
    """The detector on each task's test inputs: the share flagged, each held-out task's AUROC against all
    in-task inputs, and all held-out inputs' together (``"auroc"``).

    Args:
        detector: a fitted detector with a threshold.
        data: the in-task tasks.
        away: the held-out tasks, at least one.

    Returns:
        ``{"settings", "in_task": {task: {"n", "flagged"}}, "held_out": {task: {"n", "flagged", "auroc"}},
        "auroc"}``.
    """
    inside = {td.task.name: detector.score(td.task, td.test) for td in data}
    outside = {td.task.name: detector.score(td.task, td.test) for td in away}
    everything_in = torch.cat(list(inside.values()))
    threshold = detector.threshold if detector.threshold is not None else float("inf")

    def row(scores: torch.Tensor) -> dict[str, Any]:
        return {"n": len(scores), "flagged": float((scores > threshold).float().mean())}

    return {
        "settings": detector.settings(),
        "in_task": {name: row(s) for name, s in inside.items()},
        "held_out": {name: {**row(s), "auroc": auroc(everything_in, s)} for name, s in outside.items()},
        "auroc": auroc(everything_in, torch.cat(list(outside.values()))),
    }
