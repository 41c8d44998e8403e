"""An expert: a PEFT adapter folder plus ``adapterfuse.json`` (task, base fingerprint, training, scores).

The folder is what plain PEFT loads (``PeftModel.from_pretrained(base, folder)``); the extra JSON and
the model card are ours. A plain PEFT folder trained elsewhere (no ``adapterfuse.json``) loads too,
with empty metadata.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapterfuse._version import __version__
from adapterfuse.delta import Deltas, deltas_from_peft, peft_from_deltas
from adapterfuse.errors import ExpertError
from adapterfuse.io.atomic import atomic_dir, write_json
from adapterfuse.io.card import CardSpec, adapter_phrase, build_card, final_folder, scores_from
from adapterfuse.io.manifest import MANIFEST, Manifest, read_manifest, write_manifest

WEIGHTS = "adapter_model.safetensors"
PICKLED = "adapter_model.bin"
CONFIG = "adapter_config.json"
META = "adapterfuse.json"
CARD = "README.md"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the packages an expert's numbers depend on."""
    import peft
    import transformers

    return {
        "adapterfuse": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def _read_json(path: Path, what: str, name: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExpertError(f"expert {name!r}: {what} {path} not found; expected a PEFT adapter folder") from None
    except json.JSONDecodeError as e:
        raise ExpertError(f"expert {name!r}: {what} {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExpertError(f"expert {name!r}: {what} {path} holds a {type(data).__name__}, expected an object")
    return data


def _load_weights(folder: Path, name: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Read the adapter's tensors: safetensors, or (only if allowed) a pickle with ``weights_only``."""
    if (folder / WEIGHTS).is_file() and (folder / PICKLED).is_file():
        raise ExpertError(
            f"expert {name!r}: {folder} holds both {WEIGHTS} and {PICKLED}, expected one weight file; "
            "it is ambiguous which one is current: delete the stale one"
        )
    if (folder / WEIGHTS).is_file():
        try:
            return load_file(str(folder / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as e:
            raise ExpertError(
                f"expert {name!r}: {folder / WEIGHTS} is not a readable safetensors file "
                f"({e}); re-save or re-download the adapter"
            ) from None
    if (folder / PICKLED).is_file():
        if not allow_pickle:
            raise ExpertError(
                f"expert {name!r}: only pickled weights ({PICKLED}) found, and pickles can run "
                "code; expected adapter_model.safetensors; pass allow_pickle=True "
                "(--allow-pickle) to load it with torch.load(weights_only=True)"
            )
        try:
            return torch.load(folder / PICKLED, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses arbitrary objects with several error types
            raise ExpertError(f"expert {name!r}: {folder / PICKLED} could not be loaded safely ({e})") from None
    raise ExpertError(f"expert {name!r}: no {WEIGHTS} (or {PICKLED}) in {folder}; expected a PEFT adapter folder")


def _check_meta(meta: dict[str, Any], path: Path, name: str) -> dict[str, Any]:
    """The fields of ``adapterfuse.json`` that loading relies on, checked by type."""

    def bad(field: str, value: Any, want: str) -> ExpertError:
        return ExpertError(
            f"expert {name!r}: {path} field {field!r} is {value!r}, expected {want}; restore the file "
            f"(or delete {META} to load the folder as a plain PEFT adapter)"
        )

    if meta.get("task") is not None and not isinstance(meta["task"], str):
        raise bad("task", meta["task"], "a task name (a string)")
    if "base" in meta:
        base = meta["base"]
        if not isinstance(base, dict):
            raise bad("base", base, "an object with the base's 'spec' and 'fingerprint'")
        for key in ("spec", "fingerprint"):
            if base.get(key) is not None and not isinstance(base[key], str):
                raise bad(f"base.{key}", base[key], "a string")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise bad("format_version", version, f"an integer up to {FORMAT_VERSION} (a newer adapterfuse wrote it?)")
    return meta


@dataclass
class Expert:
    """One adapter and what we know about it.

    Attributes:
        name: a short name (the folder name by default).
        config: the PEFT ``adapter_config.json``.
        state_dict: the adapter's tensors, as PEFT saves them.
        meta: ``adapterfuse.json`` (empty for a plain PEFT folder).
        path: the folder it was loaded from, if any.
    """

    name: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def task(self) -> str | None:
        """The task it was trained on, if recorded."""
        return self.meta.get("task")

    @property
    def base_fingerprint(self) -> str | None:
        """The fingerprint of the base it was trained on, if recorded."""
        return (self.meta.get("base") or {}).get("fingerprint")

    @property
    def base_name(self) -> str | None:
        """The base's spec as recorded by us, else PEFT's ``base_model_name_or_path``."""
        return (self.meta.get("base") or {}).get("spec") or self.config.get("base_model_name_or_path")

    @property
    def peft_type(self) -> str:
        """``LORA`` or ``ADALORA`` (or whatever the config says)."""
        return str(self.config.get("peft_type", "")).upper()

    @cached_property
    def deltas(self) -> Deltas:
        """The adapter folded into per-module ΔW factors (fp32)."""
        return deltas_from_peft(self.state_dict, self.config, self.name)

    def weights_sha256(self) -> str:
        """A hash of the tensors (names, shapes and bytes), for cards and provenance."""
        h = hashlib.sha256()
        for key in sorted(self.state_dict):
            t = self.state_dict[key].detach().contiguous().cpu()
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def validate(self) -> None:
        """Check the tensors are finite and the config is a LoRA-family adapter.

        Raises:
            ExpertError: naming the expert and the tensor at fault.
        """
        for key, t in self.state_dict.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ExpertError(
                    f"expert {self.name!r}: tensor {key} has {bad} non-finite values (NaN/inf); "
                    "expected finite weights; retrain or re-download this adapter"
                )
        _ = self.deltas  # folding checks the adapter type and the factor shapes

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, allow_pickle: bool = False, verify: bool = True) -> Expert:
        """Load an expert folder (ours, or a plain PEFT adapter folder).

        Args:
            path: the folder.
            name: the expert's name; defaults to the folder name.
            allow_pickle: accept ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``).
            verify: when the folder has a ``manifest.json`` (every folder adapterfuse writes), check each
                file's sha256 against it before reading anything (``False`` checks only that they exist).

        Returns:
            The expert (not yet validated; :class:`~adapterfuse.library.ExpertLibrary` does that).

        Raises:
            ExpertError: a missing folder or file, a file changed since saving, invalid JSON, a malformed
                ``adapterfuse.json``, both weight files, unreadable or refused weights.
        """
        folder = Path(path)
        name = name or folder.name
        if not folder.is_dir():
            raise ExpertError(f"expert {name!r}: folder {folder} not found; expected a PEFT adapter folder")
        if (folder / MANIFEST).is_file():
            read_manifest(folder, verify, kinds=("expert", "merged"))
        config = _read_json(folder / CONFIG, CONFIG, name)
        meta = (
            _check_meta(_read_json(folder / META, META, name), folder / META, name) if (folder / META).is_file() else {}
        )
        state = _load_weights(folder, name, allow_pickle)
        return cls(name=name, config=config, state_dict=state, meta=meta, path=folder)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the expert folder atomically (weights as safetensors, config, metadata, card).

        Raises:
            OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        """
        with atomic_dir(path, overwrite) as tmp:
            self.write_into(tmp, load_from=str(path))
        self.path = Path(path)
        return self.path

    def write_into(
        self,
        folder: Path,
        name: str | None = None,
        settings: dict[str, Any] | None = None,
        load_from: str | None = None,
    ) -> None:
        """Write the expert's files into an existing folder (no atomicity: callers provide it).

        The folder stays a plain PEFT adapter folder; ``manifest.json`` (kind ``expert``) is written last,
        so :func:`adapterfuse.load_predictor` reads it as a predictor too.

        Args:
            folder: the folder (``peft`` may have written into it already; its files are replaced).
            name: the predictor's name in the manifest (default: the expert's name).
            settings: the predictor's settings (``{"scoring": …}``); none means the defaults.
            load_from: the folder or Hub repo id the card's load snippet names (see :meth:`card`).
        """
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict.items()},
            str(folder / WEIGHTS),
            metadata={"format": "pt"},
        )
        write_json(folder / CONFIG, self.config)
        write_json(folder / META, {"format_version": FORMAT_VERSION, **self.meta})
        (folder / CARD).write_text(self.card(load_from))
        write_manifest(folder, "expert", name or self.name, settings, self.meta.get("base"))

    def card(self, load_from: str | None = None) -> str:
        """The model card (``README.md``): Hub metadata, what the adapter is, how it was made, how to load it.

        Args:
            load_from: the Hub repo id or folder the load snippet names (default: the expert's folder).

        Returns:
            The card's text (see :func:`adapterfuse.io.card.build_card`).
        """
        m = self.meta
        training = m.get("training", {})
        spec = CardSpec(
            title=self.name,
            summary=f"{adapter_phrase(self.peft_type)} trained with adapterfuse on the GLUE task `{self.task}`.",
            base_model=self.base_name,
            library_name="peft",
            load_from=load_from or str(final_folder(self.path) if self.path else self.name),
            tags=(self.peft_type.lower(), *([self.task] if self.task else [])),
            tasks=(self.task,) if self.task else (),
            scores=scores_from({self.task: m.get("scores", {}).get("test", {})}) if self.task else (),
            facts=(
                f"base: `{self.base_name}` (fingerprint `{str(self.base_fingerprint)[:23]}…`)",
                f"method: {m.get('method', self.peft_type.lower())}, rank "
                f"{self.config.get('r', self.config.get('init_r'))}",
                f"seed: {m.get('seed')}, training examples: {training.get('train_examples')}",
            ),
            command=m.get("command"),
            recipe={"task": self.task, "base": self.base_name, "training": training},
        )
        return build_card(spec)

    def attach(self, model: torch.nn.Module, adapter_name: str = "default", copy_base: bool = True):
        """This expert on top of ``model`` as a PEFT model (see :func:`attach_experts`)."""
        return attach_experts(model, [self], [adapter_name], copy_base)

    def as_lora(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The adapter as plain LoRA tensors and config (AdaLoRA folded exactly into ΔW factors)."""
        if self.peft_type == "LORA":
            return self.state_dict, self.config
        return peft_from_deltas(self.deltas, self.base_name)


def attach_experts(
    model: torch.nn.Module, experts: Sequence[Expert], names: Sequence[str] | None = None, copy_base: bool = True
):
    """Load several experts into one PEFT model as named adapters (switch with ``set_adapter``).

    A single expert keeps its own adapter type; with several, AdaLoRA experts are folded into plain
    LoRA (exact: same ΔW) because PEFT cannot mix adapter types in one model.

    Args:
        model: the base causal LM.
        experts: the experts.
        names: adapter names (default: the experts' names, each '.' made '_': PEFT refuses dots in them).
        copy_base: deep-copy the base first so the caller's model stays untouched.

    Returns:
        A ``PeftModel`` in eval mode with the first adapter active.

    Raises:
        ExpertError: if a given name holds a '.' or an expert's tensors do not fit the base's modules.
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    names = list(names or [e.name.replace(".", "_") for e in experts])
    dotted = [n for n in names if "." in n]
    if dotted:
        raise ExpertError(
            f"adapter name {dotted[0]!r}: PEFT module names cannot hold '.'; pass a name without one "
            f"(e.g. {dotted[0].replace('.', '_')!r})"
        )
    base = copy.deepcopy(model) if copy_base else model
    peft_model = None
    for expert, name in zip(experts, names, strict=False):
        state, raw = (expert.state_dict, expert.config) if len(experts) == 1 else expert.as_lora()
        config = PeftConfig.from_peft_type(**{k: v for k, v in raw.items() if not k.startswith("_")})
        config.inference_mode = True
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        # For AdaLoRA, PEFT itself resizes the modules to the saved rank pattern while loading.
        result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
        if result.unexpected_keys:
            raise ExpertError(
                f"expert {expert.name!r}: tensors {result.unexpected_keys[:3]} do not match the "
                "base model's modules; expected an adapter trained on this base"
            )
    peft_model.set_adapter(names[0])
    return peft_model.eval()


def load_member(folder: Path, entry: dict[str, Any], manifest: Manifest) -> Expert:
    """A member expert of a saved predictor, checked against what the predictor's manifest recorded for it.

    The member's files are covered by the predictor's own manifest (checked by its loader), so they are not
    hashed again; a manifest in an older format lists no files, and then the member's recorded tensor hash
    (``sha256``) is compared instead. The recorded task must be the one the member's ``adapterfuse.json`` says.

    Args:
        folder: the member's folder.
        entry: its entry in the manifest (``name``, and optionally ``task`` and ``sha256``).
        manifest: the predictor's manifest.

    Returns:
        The member expert, named as recorded.

    Raises:
        ExpertError: the member does not load, answers another task, or its tensors changed since saving.
    """
    expert = Expert.load(folder, name=entry["name"], verify=not manifest.files)
    recorded = entry.get("task")
    if recorded is not None and expert.task is not None and recorded != expert.task:
        raise ExpertError(
            f"{manifest.kind} member {expert.name!r} at {folder}: saved as the expert for task {recorded!r}, "
            f"but its {META} says task {expert.task!r}; the folder was changed after saving: restore it "
            "or save the predictor again"
        )
    want = entry.get("sha256")
    if not manifest.files and want is not None and expert.weights_sha256() != want:
        raise ExpertError(
            f"{manifest.kind} member {expert.name!r} at {folder}: tensors hash {expert.weights_sha256()[:16]}…, "
            f"expected {str(want)[:16]}… (recorded when saved); the weights changed after saving: restore "
            "them or save the predictor again"
        )
    return expert
