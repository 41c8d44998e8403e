"""Where the base runs and in which precision: the device choice and the autocast dtype it supports.

``"auto"`` picks CUDA, then Apple's MPS, then the CPU. Under a multi-process launch (``accelerate
launch``, ``torchrun``) each process takes the GPU of its ``LOCAL_RANK``. The frozen base runs under
bf16 autocast where the device computes bf16 natively (CUDA GPUs that support it, and CPUs with
AVX512-BF16 or AMX); elsewhere (older GPUs, CPUs that would emulate bf16, MPS) it runs in fp32, because
emulated bf16 is slower than fp32. Adapter maths, label logits and losses stay fp32 everywhere.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import torch

from adapterfuse.errors import ConfigError

DeviceSpec = Literal["auto", "cpu", "cuda", "mps"] | str
"""``"auto"``, a device type (``"cpu"``, ``"cuda"``, ``"mps"``) or an indexed device (``"cuda:1"``)."""

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: DeviceSpec | torch.device = "auto") -> torch.device:
    """The device a spec names, checked against what this machine has.

    Args:
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``,
            or a ``torch.device``. A bare ``"cuda"`` (and ``"auto"`` on a GPU machine) means the GPU of
            this process's ``LOCAL_RANK`` (0 outside a multi-process launch).

    Returns:
        The ``torch.device``.

    Raises:
        ConfigError: an unknown spec, or a device this machine does not have.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device {device!r}: unknown; expected one of {', '.join(DEVICE_CHOICES)} or 'cuda:N'"
        ) from None
    if resolved.type == "cuda":
        return _cuda(resolved)
    if resolved.type == "mps" and not _mps_available():
        raise ConfigError("device 'mps': this machine has no MPS device; use --device cpu or auto")
    if resolved.type not in ("cpu", "mps"):
        raise ConfigError(f"device {device!r}: unsupported; expected one of {', '.join(DEVICE_CHOICES)} or 'cuda:N'")
    return resolved


def _cuda(device: torch.device) -> torch.device:
    """A CUDA device with its index (the process's ``LOCAL_RANK`` when none is given), checked."""
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r}: no CUDA GPU is visible; use --device cpu or auto")
    index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device 'cuda:{index}': only {torch.cuda.device_count()} GPU(s) visible; expected an index "
            f"below {torch.cuda.device_count()}, or launch at most that many processes"
        )
    return torch.device("cuda", index)


def autocast_dtype_for(device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype of the frozen base on a kind of device, or ``None`` for plain fp32.

    bf16 where it is computed natively: a CUDA GPU or a CPU that supports it. Elsewhere (a GPU or CPU
    that would emulate bf16, MPS) fp32: emulated bf16 is slower than fp32, and fp16 would need loss
    scaling to be trusted.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ``"mps"`` …
        bf16_supported: whether that device computes bf16 natively (read for CPU and CUDA).

    Returns:
        ``torch.bfloat16`` or ``None``.
    """
    if device_type in ("cpu", "cuda") and bf16_supported:
        return torch.bfloat16
    return None


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype on this machine's ``device`` (see :func:`autocast_dtype_for`)."""
    kind = torch.device(device).type
    native = _cuda_bf16() if kind == "cuda" else cpu_bf16() if kind == "cpu" else False
    return autocast_dtype_for(kind, native)


@functools.cache
def cpu_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively: the ``avx512_bf16`` or ``amx_bf16`` instructions.

    Without them bf16 matmuls are emulated and run several times slower than fp32. Where the CPU's flags
    cannot be read (no ``/proc/cpuinfo``: macOS, Windows) the answer is no, so the base runs in fp32.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cuda_bf16() -> bool:
    """Whether the current GPU computes bf16 natively (emulated bf16 is slower than fp32)."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the keyword answers for native support
        return bool(torch.cuda.is_bf16_supported())


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def available_memory(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the kernel's ``MemAvailable`` for the
    CPU (Linux); ``None`` where it cannot be read (MPS, other systems)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
