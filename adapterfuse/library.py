"""ExpertLibrary: named experts over one base, the single compatibility check, and where experts come from.

Experts are given as :class:`Expert` objects, expert folders, Hub ids or a library. Paths are checked for
existence before any weight is read, so a typo fails at once; Hub ids (``owner/name`` that is not an
existing path) are downloaded into the Hugging Face cache first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from adapterfuse.base import BaseModel, fingerprints_conflict, is_legacy_fingerprint
from adapterfuse.errors import CompatibilityError, ConfigError, ExpertError
from adapterfuse.expert import Expert


class ExpertLibrary:
    """A set of experts that can be combined: same base, finite weights, consistent configs.

    Args:
        experts: the experts; names must be unique.
        base_fingerprint: if given, every expert that recorded a fingerprint must match it.

    Raises:
        ConfigError: no experts, or repeated names.
        CompatibilityError / ExpertError: see :meth:`check`.
    """

    def __init__(self, experts: Sequence[Expert], base_fingerprint: str | None = None) -> None:
        if not experts:
            raise ConfigError("experts: expected at least one expert, got none")
        names = [e.name for e in experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"experts: names must be unique, got {dupes} more than once; rename the folders")
        self.experts = list(experts)
        self.notes: list[str] = []
        self.check(base_fingerprint)

    @classmethod
    def load(
        cls,
        paths: Sequence[str | Path],
        base_fingerprint: str | None = None,
        allow_pickle: bool = False,
        verify: bool = True,
    ) -> ExpertLibrary:
        """Load expert folders (each checked against its manifest unless ``verify`` is false) and check
        them together (see :meth:`check`)."""
        return cls([Expert.load(p, allow_pickle=allow_pickle, verify=verify) for p in paths], base_fingerprint)

    def __iter__(self) -> Iterator[Expert]:
        return iter(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(f"no expert named {name!r}; have {[e.name for e in self.experts]}")

    def by_task(self) -> dict[str, list[Expert]]:
        """Experts grouped by the task they were trained on (unknown task: key ``None``)."""
        out: dict[str, list[Expert]] = {}
        for e in self.experts:
            out.setdefault(e.task, []).append(e)
        return out

    def check(self, base_fingerprint: str | None = None) -> None:
        """The one compatibility check every backend relies on.

        Each expert must be finite and LoRA-family; all must share one base (the recorded fingerprint,
        or, for plain PEFT folders without one, the base name and the module shapes, which is weaker
        and is noted in ``self.notes``); a module must have one ΔW shape across experts.

        Raises:
            ExpertError: an expert with NaN/inf weights or a non-LoRA config.
            CompatibilityError: naming the two experts and the field that differs.
        """
        for e in self.experts:
            e.validate()
        check_task_names(self.experts)
        ref = self.experts[0]
        # Older-form fingerprints (a hash of a serialised config) cannot be compared: the first weight-based one rules.
        recorded = [e for e in self.experts if e.base_fingerprint and not is_legacy_fingerprint(e.base_fingerprint)]
        want = base_fingerprint or (recorded[0].base_fingerprint if recorded else None)
        against = "the loaded base" if base_fingerprint else repr(recorded[0].name) if recorded else ""
        for e in self.experts:
            got = e.base_fingerprint
            if fingerprints_conflict(got, want):
                raise CompatibilityError(
                    f"expert {e.name!r}: base fingerprint {got[:19]}… differs from {want[:19]}… "
                    f"({against}); experts must be trained "
                    "on the same base model"
                )
            if got is None or is_legacy_fingerprint(got):
                if e.base_name != ref.base_name:
                    raise CompatibilityError(
                        f"expert {e.name!r}: base_model_name_or_path {e.base_name!r} differs "
                        f"from {ref.base_name!r} of expert {ref.name!r}"
                    )
                self.notes.append(
                    f"expert {e.name!r} records no base fingerprint; compatibility checked by base "
                    f"name {e.base_name!r} and module shapes only"
                    if got is None
                    else f"expert {e.name!r} records its base fingerprint in the older, config-based form, which "
                    f"changes with the transformers version; compatibility checked by base name {e.base_name!r} "
                    "and module shapes only"
                )
        shapes: dict[str, tuple[tuple[int, int], str]] = {}
        for e in self.experts:
            for module, d in e.deltas.items():
                seen = shapes.setdefault(module, (d.shape, e.name))
                if seen[0] != d.shape:
                    raise CompatibilityError(
                        f"module {module!r}: expert {e.name!r} has ΔW shape {d.shape}, "
                        f"expert {seen[1]!r} has {seen[0]}; experts must share one base"
                    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ExpertsInput = ExpertLibrary | Sequence[Expert | str | Path]
"""What :func:`~adapterfuse.backends.merge.api.merge` accepts as ``experts``."""


def count_experts(experts: Any) -> int:
    """How many experts were given, without loading any (for early weight-count checks).

    Raises:
        ConfigError: if ``experts`` is not a library or a non-empty list.
    """
    if isinstance(experts, ExpertLibrary):
        return len(experts)
    if isinstance(experts, (str, Path, Expert)) or not isinstance(experts, Sequence) or not experts:
        raise ConfigError(
            "experts: expected a non-empty list of Expert objects, expert folders or Hub ids, "
            f"or an ExpertLibrary; got {type(experts).__name__}"
            + (" (a single expert? wrap it in a list)" if isinstance(experts, (str, Path, Expert)) else "")
        )
    return len(experts)


def is_hub_id(item: str | Path) -> bool:
    """A string that is not an existing path and looks like ``owner/name``."""
    return isinstance(item, str) and not Path(item).expanduser().exists() and bool(_HUB_ID.match(item))


def check_sources(experts: Any) -> None:
    """Refuse items that are neither experts, existing folders nor Hub ids, before anything is read.

    Raises:
        ConfigError: an item of the wrong type.
        ExpertError: a path that does not exist and is not a Hub id.
    """
    if isinstance(experts, ExpertLibrary):
        return
    for i, item in enumerate(experts):
        if isinstance(item, Expert):
            continue
        if not isinstance(item, (str, Path)):
            raise ConfigError(f"experts[{i}]: expected an Expert, a folder path or a Hub id, got {type(item).__name__}")
        if not Path(item).expanduser().exists() and not is_hub_id(item):
            raise ExpertError(
                f"expert {str(item)!r}: folder not found and not a Hub id ('owner/name'); "
                "expected a PEFT adapter folder"
            )


def download(repo_id: str) -> Path:
    """Download an adapter repository from the Hub into the HF cache.

    Raises:
        ExpertError: when it cannot be fetched (offline, unknown repo, no access).
    """
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.md"]))
    except Exception as e:  # the Hub client raises many types (offline, 404, 401, timeouts)
        raise ExpertError(
            f"expert {repo_id!r}: could not download it from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the id and "
            "your network, or pass a local adapter folder"
        ) from None


def load_one(item: Expert | str | Path, allow_pickle: bool, verify: bool = True) -> Expert:
    """An :class:`Expert` from an expert, a folder or a Hub id (see :meth:`Expert.load` for ``verify``)."""
    if isinstance(item, Expert):
        return item
    if is_hub_id(item):
        return Expert.load(download(str(item)), name=str(item), allow_pickle=allow_pickle, verify=verify)
    return Expert.load(Path(item).expanduser(), allow_pickle=allow_pickle, verify=verify)


def load_library(
    experts: Any, base: BaseModel | None = None, allow_pickle: bool = False, verify: bool = True
) -> ExpertLibrary:
    """Load and check the experts together (the library's compatibility check).

    Args:
        experts: an :class:`ExpertLibrary`, or a list of experts, folders and Hub ids.
        base: when given, every expert that records a base fingerprint must match it.
        allow_pickle: accept ``adapter_model.bin`` files (loaded with ``weights_only``).
        verify: check each expert folder's files against its manifest before reading them.

    Returns:
        The checked library.

    Raises:
        ConfigError, ExpertError, CompatibilityError: see :class:`ExpertLibrary` and :func:`check_against_base`.
    """
    fingerprint = base.fingerprint if base is not None else None
    if isinstance(experts, ExpertLibrary):
        library = experts
        library.check(fingerprint)
    else:
        count_experts(experts)
        check_sources(experts)
        library = ExpertLibrary([load_one(item, allow_pickle, verify) for item in experts], fingerprint)
    if base is not None:
        check_against_base(library, base)
    return library


def check_task_names(experts: Sequence[Expert]) -> None:
    """An expert named after one task must not record another (a folder ``rte`` holding an sst2 expert).

    Raises:
        CompatibilityError: naming the expert, the task its name says and the task it records.
    """
    from adapterfuse.tasks.glue import TASKS

    for e in experts:
        named = TASKS.get(e.name)
        if named is not None and e.task is not None and named.train_task != e.task:
            raise CompatibilityError(
                f"expert {e.name!r}: named after task {e.name!r}, but its adapterfuse.json records task "
                f"{e.task!r}; expected the expert of {named.train_task!r}: use that task's folder, or rename "
                "this one after the task it was trained on"
            )


def same_base_name(recorded: str, base: BaseModel) -> bool:
    """Whether a recorded base name is the loaded base's: the same spec or source, or the same last path part
    (a Hub id and a local copy of it)."""
    last = recorded.rstrip("/").rpartition("/")[2].lower()
    return any(recorded == n or last == n.rstrip("/").rpartition("/")[2].lower() for n in (base.spec, base.source))


def check_against_base(library: ExpertLibrary, base: BaseModel) -> None:
    """Each expert against the loaded base: the recorded base name (experts with no fingerprint), every
    module it has tensors for present with the same shape, and every module its config targets covered.

    Raises:
        CompatibilityError: another base name, a module the base lacks or of another shape.
        ExpertError: a module the config targets in this base without tensors (an incomplete adapter).
    """
    from adapterfuse.adapter_config import read_adapter_config
    from adapterfuse.delta import module_names

    modules = dict(base.model.named_modules())
    for e in library:
        if e.base_fingerprint is None and e.base_name and not same_base_name(e.base_name, base):
            raise CompatibilityError(
                f"expert {e.name!r}: adapter_config.json names base {e.base_name!r}, the loaded base is "
                f"{base.spec!r}; expected an adapter trained on this base: load {e.base_name!r} as the base, "
                "or correct base_model_name_or_path if it is the same model under another name"
            )
        for module, d in e.deltas.items():
            weight = getattr(modules.get(module), "weight", None)
            if weight is None or tuple(weight.shape) != d.shape:
                got = "no such module" if weight is None else f"weight shape {tuple(weight.shape)}"
                raise CompatibilityError(
                    f"expert {e.name!r}: module {module!r} has ΔW shape {d.shape}, the base {base.spec!r} has "
                    f"{got}; expected an adapter trained on this base"
                )
        spec = read_adapter_config(e.config, e.name)
        have = module_names(e.state_dict)
        linear = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
        missing = [n for n in linear if n not in have and spec.targets(n)]
        if missing:
            raise ExpertError(
                f"expert {e.name!r}: target_modules covers {len(missing)} module(s) of the base with no tensors "
                f"(e.g. {missing[:3]}); expected tensors for every targeted module: the adapter file is "
                "incomplete, re-save it with PEFT"
            )
