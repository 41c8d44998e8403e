"""Synthetic experts with random, seeded factors: for benchmarks and tests, where no training is needed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from adapterfuse.base import BaseModel
from adapterfuse.delta import Deltas, LowRank, peft_from_deltas
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.surgery import linear_modules


def random_deltas(
    model: nn.Module, rank: int, modules: Sequence[str] | None = None, seed: int = 0, scale: float = 1.0
) -> Deltas:
    """Random low-rank updates with a norm comparable to the weights they update.

    Args:
        model: the base causal LM (only shapes and weight norms are read).
        rank: the rank of every module's update.
        modules: the module names (default: every linear of the decoder).
        seed: the seed of the factors.
        scale: ``||ΔW||_F / ||W||_F`` on average; 0 gives an adapter that changes nothing.

    Returns:
        Module -> :class:`LowRank`.

    Raises:
        ConfigError: for a rank below 1 or an unknown module.
    """
    if rank < 1:
        raise ConfigError(f"rank: expected >= 1, got {rank}")
    gen = torch.Generator().manual_seed(seed)
    out: Deltas = {}
    for name in modules if modules is not None else linear_modules(model):
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise ConfigError(f"module {name!r}: not found in the base model") from None
        out_dim, in_dim = weight.shape
        A = torch.randn(rank, in_dim, generator=gen) / in_dim**0.5
        B = torch.randn(out_dim, rank, generator=gen)
        # Scale B so that ||B @ A||_F ≈ scale * ||W||_F: a visible, but not overwhelming, change.
        B *= scale * float(weight.detach().float().norm()) / max(float((B @ A).norm()), 1e-12)
        out[name] = LowRank(A.contiguous(), B.contiguous())
    return out


def random_expert(
    base: BaseModel,
    name: str,
    rank: int = 8,
    modules: Sequence[str] | None = None,
    seed: int = 0,
    scale: float = 0.5,
    task: str | None = None,
) -> Expert:
    """A synthetic LoRA expert on ``base``, with random seeded factors (see :func:`random_deltas`).

    Returns:
        An in-memory :class:`Expert` recording ``base``'s spec and fingerprint.
    """
    state, config = peft_from_deltas(random_deltas(base.model, rank, modules, seed, scale), base.spec)
    meta = {
        "task": task,
        "method": "synthetic",
        "seed": seed,
        "base": {"spec": base.spec, "fingerprint": base.fingerprint},
    }
    return Expert(name=name, config=config, state_dict=state, meta=meta)


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32, built from a config (random weights, seeded): the test-sized base."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # the pad id wrap_base gives the tokenizer, so the model does not depend on whether that ran first
        # (transformers before 5 zeroes the padding row of the embeddings at initialisation)
        pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)
