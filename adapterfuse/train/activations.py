"""Activation checkpointing for a training run whose largest step would not fit in memory.

A parameter-efficient ensemble runs each step's batch once per member (BatchEnsemble, CAMERO), so the
activations kept for the backward pass grow K-fold and, on long inputs, can outgrow the machine. Before
the run, the largest step's activations are estimated from the model's shape; when they would take more
than half of the memory free on the device, every decoder layer is checkpointed (its activations
recomputed in the backward pass). Recomputation runs the same kernels on the same inputs with the same
random state, so the trained tensors are the same bytes either way; only the time per step and the peak
memory change.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from adapterfuse.device import available_memory, model_device
from adapterfuse.progress import status

# Floats a decoder layer keeps per token for the backward pass, with a member layer on every linear
# module: the base's own (norms, projections, attention output, residuals; gate, up, activation, product)
# and each member layer's scaled input and output. Read off the resident memory of BatchEnsemble steps on
# SmolLM2-135M (about 24 vectors of the hidden size and 12 of the MLP's width); counted in fp32.
_HIDDEN_VECTORS, _MLP_VECTORS, _BYTES = 24, 12, 4


def activation_bytes(config: Any, tokens: int) -> int:
    """The estimated activation memory of a forward pass over ``tokens`` tokens (padding included).

    Args:
        config: the model's config (``hidden_size``, ``num_hidden_layers``, and ``intermediate_size`` when
            it has one: four times the hidden size otherwise).
        tokens: rows times padded length of the step.

    Returns:
        Bytes.
    """
    mlp = getattr(config, "intermediate_size", None) or 4 * config.hidden_size  # GPT-2-style configs have none
    per_token = _HIDDEN_VECTORS * config.hidden_size + _MLP_VECTORS * mlp
    return per_token * config.num_hidden_layers * _BYTES * tokens


def checkpoint_if_needed(model: nn.Module, largest_step_tokens: int, share: float = 0.5) -> bool:
    """Turn on activation checkpointing of ``model`` when its largest step would take over ``share`` of the
    memory free on its device.

    Args:
        model: a transformers model (a private copy: the caller's base is not touched).
        largest_step_tokens: rows times padded length of the run's largest step.
        share: the part of the free memory a step's activations may take.

    Returns:
        Whether checkpointing was turned on.
    """
    free = available_memory(model_device(model))
    need = activation_bytes(model.config, largest_step_tokens)
    if free is None or need <= share * free:
        return False
    status(
        f"activation checkpointing on: the largest step's activations (about {need / 2**30:.1f} GiB) would take "
        f"over {share:.0%} of the {free / 2**30:.1f} GiB free; same result, more time per step"
    )
    kwargs = {"use_reentrant": False}  # the frozen base's inputs need no gradient under this variant
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5; the older name before it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True
