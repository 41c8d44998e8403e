"""K experts in one batched forward pass over a private copy of the frozen base.

Every member's factors are stacked per module (``A`` as ``[K, r_max, in]``, ``B`` as ``[K, out, r_max]``;
smaller ranks and missing modules are zero-padded, which adds exactly nothing to ΔW; see
:func:`adapterfuse.lowrank.stack_members`). The batch is replicated member by member (rows
``k*n .. (k+1)*n - 1`` belong to member ``k``), so in every adapted linear (a member-weighted
:class:`~adapterfuse.surgery.StackedLoRALinear`) one base matmul serves all ``K*n`` rows and the
low-rank parts are two batched matmuls on ``x.view(K, n*T, in)``: no Python loop over members, no
gather or scatter. The token embeddings are looked up once for ``[n, T]`` and repeated; the answer is
read off the label words only (:func:`adapterfuse.head.member_logits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapterfuse.delta import Deltas
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.head import DEFAULT_MAX_LENGTH, autocast_context, iter_batches, label_token_ids, member_logits
from adapterfuse.lowrank import Stacked, stack_members
from adapterfuse.surgery import StackedLoRALinear, replace_linear, shared_copy
from adapterfuse.tasks.spec import Example, TaskSpec


def _install(model: nn.Module, stacked: Stacked) -> list[str]:
    """Swap every stacked module of ``model`` for a member-weighted :class:`StackedLoRALinear`; return their names."""
    device = next(model.parameters()).device
    for module, (A, B) in stacked.items():
        replace_linear(
            model,
            module,
            lambda target, a=A, b=B: StackedLoRALinear(target, a.to(device), b.to(device)),
            (B.shape[1], A.shape[2]),
        )
    return list(stacked)


# Rows (inputs x members) per forward pass. On this CPU, 64 SST-2 prompts x 8 members in one pass ran at
# 0.73 of the ideal speed against 0.97-1.13 at 128-256 rows (benchmarks/bench_ensemble.py): past a few
# hundred rows the activations fall out of cache, so larger batches are split.
MAX_ROWS = 256


class BatchedEnsemble:
    """K experts over one frozen base, run as one batched forward pass.

    Args:
        model: the base causal LM (plain, not a PEFT model); it is never modified.
        members: the experts, or their ``module -> LowRank`` mappings.
        names: names of the members (default: the experts' names, or ``member-i``).
        max_rows: the most rows (inputs x members) one forward pass runs; a larger batch is split.

    Raises:
        ConfigError: no members, ``max_rows < 1``, or a PEFT-wrapped model.
        CompatibilityError: a module missing from the base, not linear, or of another shape.
    """

    def __init__(
        self,
        model: nn.Module,
        members: Sequence[Expert | Deltas],
        names: Sequence[str] | None = None,
        max_rows: int = MAX_ROWS,
    ) -> None:
        if max_rows < 1:
            raise ConfigError(f"max_rows: expected >= 1, got {max_rows}")
        self.max_rows = max_rows
        if not members:
            raise ConfigError("members: expected at least one expert, got none")
        if hasattr(model, "get_base_model"):
            raise ConfigError("model: got a PEFT model; expected the plain base model (adapters are added here)")
        deltas = [m.deltas if isinstance(m, Expert) else m for m in members]
        self.names = (
            list(names)
            if names is not None
            else [m.name if isinstance(m, Expert) else f"member-{i}" for i, m in enumerate(members)]
        )
        self.model = shared_copy(model).eval()
        self.modules = _install(self.model, stack_members(deltas, self.names))

    @property
    def k(self) -> int:
        """The number of members."""
        return len(self.names)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def member_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_ids: Sequence[int]
    ) -> torch.Tensor:
        """Every member's next-token logits over the label words, fp32 ``[K, n, n_labels]``.

        Args:
            input_ids: ``[n, T]`` right-padded tokens (not replicated: this does it).
            attention_mask: ``[n, T]``.
            label_ids: the label words' token ids.
        """
        k, n = self.k, input_ids.shape[0]
        if k * n > self.max_rows and n > 1:
            step = max(1, self.max_rows // k)
            return torch.cat(
                [
                    self.member_logits(input_ids[i : i + step], attention_mask[i : i + step], label_ids)
                    for i in range(0, n, step)
                ],
                dim=1,
            )
        return member_logits(self.model, input_ids, attention_mask, label_ids, k)

    @torch.no_grad()
    def member_log_probs(
        self,
        tokenizer: PreTrainedTokenizerBase,
        task: TaskSpec,
        examples: Sequence[Example],
        batch_size: int = 32,
        autocast: bool = True,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> torch.Tensor:
        """Every member's log-probabilities over the task's label words, in the input order.

        Args:
            tokenizer: the base's tokenizer.
            task: the task whose prompt and label words to use.
            examples: the inputs.
            batch_size: inputs per batch (each runs as ``K * batch_size`` rows); batches by similar length.
            autocast: run under bf16 autocast (the low-rank parts too, as in PEFT; the logits stay fp32).
            max_length: prompt length cap (see :func:`adapterfuse.head.encode`).

        Returns:
            ``[K, n, n_labels]`` fp32 log-softmax over the label words.

        Raises:
            ConfigError: for a batch size below 1.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
        labels = label_token_ids(task, tokenizer)
        out = torch.empty((self.k, len(examples), len(labels)), dtype=torch.float32)
        device = self.device
        for idx, ids, mask in iter_batches(task, examples, tokenizer, batch_size, max_length):
            with autocast_context(autocast, device):
                logits = self.member_logits(ids.to(device), mask.to(device), labels)
            out[:, idx] = torch.log_softmax(logits.float(), dim=-1).cpu()
        return out
