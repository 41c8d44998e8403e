"""A per-input linear merge, exact for every input, in one pass: the merge weights applied in rank space.

Merging experts linearly with weights ``w`` gives ``ΔW = Σ_e w_e B_e A_e`` = ``B diag(w per rank slot) A``
for the factors concatenated along the rank axis (:func:`adapterfuse.backends.merge.functional.stack_factors`,
the exact low-rank form of a linear merge). Applying ``diag(w)`` to the rank-space activations row by
row lets every input of a batch have its own merge, which is what a router's per-input weights ask for,
and keeps a routed batch equal to its inputs routed one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapterfuse.backends.route.routers.arrow import shared_copy
from adapterfuse.delta import Deltas
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.head import autocast_context, iter_batches, label_logits, label_token_ids
from adapterfuse.lowrank import stack_factors
from adapterfuse.tasks.spec import Example, TaskSpec


class RowMergedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus, for each batch row, the linear merge of K experts at that row's weights.

    Args:
        base: the base linear layer (shared, never changed).
        A: ``[R, in]`` the experts' ``A`` factors concatenated (``R = Σ r_e``).
        B: ``[out, R]`` their ``B`` factors concatenated.
        slots: ``[R]`` the expert of each rank slot.

    Attributes:
        weights: ``[n, K]`` each row's merge weights; set by :class:`RowMergeModel` before a pass.
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("slots", slots, persistent=False)
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + (Σ_e w_{row,e} ΔW_e) x`` for each row of ``x`` (``[n, ..., in]``)."""
        y = self.base(x)
        if self.weights is None or self.weights.shape[0] != x.shape[0]:
            raise ConfigError("row merge: expected one weight row per batch row; set them with RowMergeModel")
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.reshape(x.shape[0], -1, x.shape[-1]).float() @ self.A.T  # [n, T, R]
            scale = self.weights[:, self.slots].unsqueeze(1).to(h.dtype)  # [n, 1, R]
            low = (h * scale) @ self.B.T
        return y + low.view(y.shape).to(y.dtype)


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
        self.layers: list[RowMergedLinear] = []
        device = next(self.model.parameters()).device
        for module in sorted(set().union(*(m.keys() for m in members))):
            present = [(i, m[module]) for i, m in enumerate(members) if module in m and m[module].rank > 0]
            if not present:
                continue
            stacked = stack_factors([(1.0, d) for _, d in present])  # weight 1: the weights enter per row
            slots = torch.cat([torch.full((d.rank,), i, dtype=torch.long) for i, d in present])
            target = self.model.get_submodule(module)
            if not isinstance(target, nn.Linear) or tuple(target.weight.shape) != stacked.shape:
                raise CompatibilityError(f"module {module!r}: the base has no nn.Linear of ΔW shape {stacked.shape}; "
                                         "expected experts trained on this base")
            layer = RowMergedLinear(target, stacked.A.to(device), stacked.B.to(device), slots.to(device))
            parent, _, child = module.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
            self.layers.append(layer)

    @torch.no_grad()
    def log_probs(self, tokenizer: PreTrainedTokenizerBase, task: TaskSpec, examples: Sequence[Example],
                  weights: torch.Tensor, batch_size: int = 32, autocast: bool = True,
                  max_length: int = 256) -> torch.Tensor:
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
