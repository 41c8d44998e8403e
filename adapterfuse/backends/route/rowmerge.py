"""A per-input linear merge, exact for every input, in one pass: the merge weights applied in rank space.

Merging experts linearly with weights ``w`` gives ``ΔW = Σ_e w_e B_e A_e`` = ``B diag(w per rank slot) A``
for the factors concatenated along the rank axis (:func:`adapterfuse.lowrank.slot_factors`, the exact
low-rank form of a linear merge). Applying ``diag(w)`` to the rank-space activations row by row (a
``"row"`` :class:`~adapterfuse.surgery.StackedLoRALinear`, in fp32) lets every input of a batch have its
own merge, which is what a router's per-input weights ask for, and keeps a routed batch equal to its
inputs routed one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapterfuse.delta import Deltas
from adapterfuse.errors import ConfigError
from adapterfuse.head import autocast_context, iter_batches, label_logits, label_token_ids
from adapterfuse.lowrank import slot_factors
from adapterfuse.surgery import StackedLoRALinear, replace_linear, shared_copy
from adapterfuse.tasks.spec import Example, TaskSpec


class RowMergeModel:
    """K experts over a private copy of the base, merged per input at that input's weights.

    Args:
        model: the base causal LM (never modified; the copy shares its weights).
        members: each member's updates.

    Raises:
        ConfigError: no members.
        CompatibilityError: a module missing from the base, not linear, or of another shape.
    """

    def __init__(self, model: nn.Module, members: Sequence[Deltas]) -> None:
        if not members:
            raise ConfigError("row merge: expected at least one expert, got none")
        self.k = len(members)
        self.model = shared_copy(model).eval()
        self.layers: list[StackedLoRALinear] = []
        device = next(self.model.parameters()).device
        for module in sorted(set().union(*(m.keys() for m in members))):
            factors = [m.get(module) for m in members]
            if all(f is None or f.rank == 0 for f in factors):
                continue
            stacked, slots = slot_factors(factors)
            # The low-rank part runs in fp32 even under autocast: each row's merge in full precision.
            self.layers.append(
                replace_linear(
                    self.model,
                    module,
                    lambda target, lr=stacked, s=slots: StackedLoRALinear(
                        target, lr.A.to(device), lr.B.to(device), s.to(device), weighting="row", fp32=True
                    ),
                    stacked.shape,
                )
            )

    @torch.no_grad()
    def log_probs(
        self,
        tokenizer: PreTrainedTokenizerBase,
        task: TaskSpec,
        examples: Sequence[Example],
        weights: torch.Tensor,
        batch_size: int = 32,
        autocast: bool = True,
        max_length: int = 256,
    ) -> torch.Tensor:
        """Each input's log-probabilities over the label words under its own merge.

        Args:
            tokenizer: the base's tokenizer.
            task: the task.
            examples: the inputs.
            weights: ``[n, K]`` merge weights per input.
            batch_size, autocast, max_length: scoring settings.

        Returns:
            ``[n, n_labels]`` fp32 log-softmax, in the input order.
        """
        labels = label_token_ids(task, tokenizer)
        out = torch.empty((len(examples), len(labels)), dtype=torch.float32)
        device = next(self.model.parameters()).device
        for idx, ids, mask in iter_batches(task, examples, tokenizer, batch_size, max_length):
            for layer in self.layers:
                layer.weights = weights[idx].float().to(device)
            with autocast_context(autocast, device):
                logits = label_logits(self.model, ids.to(device), mask.to(device), labels)
            out[idx] = torch.log_softmax(logits.float(), dim=-1).cpu()
        return out
