"""K experts in one batched forward pass over a private copy of the frozen base.

Every member's factors are stacked per module (``A`` as ``[K, r_max, in]``, ``B`` as ``[K, out, r_max]``;
smaller ranks and missing modules are zero-padded, which adds exactly nothing to ΔW). The batch is
replicated member by member (rows ``k*n .. (k+1)*n - 1`` belong to member ``k``), so in every adapted
linear one base matmul serves all ``K*n`` rows and the low-rank parts are two batched matmuls on
``x.view(K, n*T, in)``: no Python loop over members, no gather or scatter. The token embeddings are
looked up once for ``[n, T]`` and repeated; the answer is read off the label words only, as in
:func:`adapterfuse.head.label_logits`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapterfuse.delta import Deltas
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.expert import Expert
from adapterfuse.head import DEFAULT_MAX_LENGTH, autocast_context, iter_batches, label_token_ids
from adapterfuse.tasks.spec import Example, TaskSpec

Stacked = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Module name -> ``(A [K, r_max, in], B [K, out, r_max])``, fp32."""


def stack_factors(members: Sequence[Mapping[str, object]], names: Sequence[str]) -> Stacked:
    """Stack the members' low-rank factors module by module, zero-padding ranks and missing modules.

    Args:
        members: one ``module -> LowRank`` mapping per member (AdaLoRA already folded, see ``Expert.deltas``).
        names: the members' names, for error messages.

    Returns:
        Module -> ``(A, B)`` with ``B[k] @ A[k]`` equal to member ``k``'s ΔW (zero where it lacks the
        module). Modules of rank 0 in every member are left out.

    Raises:
        CompatibilityError: if two members disagree on a module's ΔW shape.
    """
    stacked: Stacked = {}
    k = len(members)
    for module in sorted(set().union(*(m.keys() for m in members))):
        present = [(i, m[module]) for i, m in enumerate(members) if module in m]
        out_dim, in_dim = present[0][1].shape
        for i, d in present:
            if d.shape != (out_dim, in_dim):
                raise CompatibilityError(f"module {module!r}: member {names[i]!r} has ΔW shape {d.shape}, member "
                                         f"{names[present[0][0]]!r} has {(out_dim, in_dim)}; expected one shape")
        r_max = max(d.rank for _, d in present)
        if r_max == 0:
            continue
        A = torch.zeros(k, r_max, in_dim, dtype=torch.float32)
        B = torch.zeros(k, out_dim, r_max, dtype=torch.float32)
        for i, d in present:
            A[i, : d.rank] = d.A.float()
            B[i, :, : d.rank] = d.B.float()
        stacked[module] = (A, B)
    return stacked


class StackedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus K low-rank updates, one per contiguous block of rows.

    Args:
        base: the base linear layer (its weights are shared, never changed).
        A: ``[K, r, in]`` fp32 factors.
        B: ``[K, out, r]`` fp32 factors (scale folded in).
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        # Buffers, not parameters: they move with .to() but are never trained or saved with the model.
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)

    @property
    def k(self) -> int:
        """The number of members."""
        return int(self.A.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + B_k A_k x`` for the rows of member ``k``; ``x`` is ``[K*n, ..., in]``."""
        y = self.base(x)  # one matmul for every member's rows (bf16 under autocast)
        if x.shape[0] % self.k:
            raise ConfigError(f"batched forward: {x.shape[0]} rows is not a multiple of K={self.k} members; "
                              "expected the batch replicated once per member")
        h = x.reshape(self.k, -1, x.shape[-1])
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.A.dtype)  # e.g. a bf16-loaded base without autocast: the factors stay fp32
        # Under autocast the two bmm run in the autocast dtype, as PEFT's LoRA layers do: an fp32 detour
        # (casting every activation up and back) measured slower than K separate PEFT passes. Without
        # autocast everything is fp32 and equals each member run alone.
        low = torch.bmm(torch.bmm(h, self.A.transpose(1, 2)), self.B.transpose(1, 2))
        return y + low.view(y.shape).to(y.dtype)


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer with ``model``.

    The copy's modules can be swapped freely without touching the caller's model, and no weight is
    duplicated (the base is frozen, so sharing is safe).
    """
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _install(model: nn.Module, stacked: Stacked) -> list[str]:
    """Swap every stacked module of ``model`` for a :class:`StackedLoRALinear`; return their names."""
    device = next(model.parameters()).device
    for module, (A, B) in stacked.items():
        try:
            target = model.get_submodule(module)
        except AttributeError:
            raise CompatibilityError(f"module {module!r}: not found in the base model; expected experts trained "
                                     "on this base") from None
        if not isinstance(target, nn.Linear):
            raise CompatibilityError(f"module {module!r}: is a {type(target).__name__}, expected nn.Linear; the "
                                     "batched ensemble adapts linear layers only")
        if tuple(target.weight.shape) != (B.shape[1], A.shape[2]):
            raise CompatibilityError(f"module {module!r}: base weight is {tuple(target.weight.shape)}, the "
                                     f"experts' ΔW is {(B.shape[1], A.shape[2])}; expected the same base")
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StackedLoRALinear(target, A.to(device), B.to(device)))
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

    def __init__(self, model: nn.Module, members: Sequence[Expert | Deltas],
                 names: Sequence[str] | None = None, max_rows: int = MAX_ROWS) -> None:
        if max_rows < 1:
            raise ConfigError(f"max_rows: expected >= 1, got {max_rows}")
        self.max_rows = max_rows
        if not members:
            raise ConfigError("members: expected at least one expert, got none")
        if hasattr(model, "get_base_model"):
            raise ConfigError("model: got a PEFT model; expected the plain base model (adapters are added here)")
        deltas = [m.deltas if isinstance(m, Expert) else m for m in members]
        self.names = list(names) if names is not None else [
            m.name if isinstance(m, Expert) else f"member-{i}" for i, m in enumerate(members)]
        self.model = _private_copy(model).eval()
        self.modules = _install(self.model, stack_factors(deltas, self.names))

    @property
    def k(self) -> int:
        """The number of members."""
        return len(self.names)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def member_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      label_ids: Sequence[int]) -> torch.Tensor:
        """Every member's next-token logits over the label words, fp32 ``[K, n, n_labels]``.

        Args:
            input_ids: ``[n, T]`` right-padded tokens (not replicated: this does it).
            attention_mask: ``[n, T]``.
            label_ids: the label words' token ids.
        """
        k, n = self.k, input_ids.shape[0]
        if k * n > self.max_rows and n > 1:
            step = max(1, self.max_rows // k)
            return torch.cat([self.member_logits(input_ids[i:i + step], attention_mask[i:i + step], label_ids)
                              for i in range(0, n, step)], dim=1)
        embeds = self.model.get_input_embeddings()(input_ids)  # once for [n, T], shared by all members
        mask = attention_mask.repeat(k, 1)
        hidden = self.model.get_decoder()(inputs_embeds=embeds.repeat(k, 1, 1), attention_mask=mask,
                                          use_cache=False).last_hidden_state
        last = mask.sum(dim=1) - 1
        h = hidden[torch.arange(k * n, device=hidden.device), last].float()
        head = self.model.get_output_embeddings()
        idx = torch.as_tensor(list(label_ids), device=h.device)
        logits = h @ head.weight[idx].float().T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[idx].float()
        return logits.view(k, n, len(idx))

    @torch.no_grad()
    def member_log_probs(self, tokenizer: PreTrainedTokenizerBase, task: TaskSpec, examples: Sequence[Example],
                         batch_size: int = 32, autocast: bool = True,
                         max_length: int = DEFAULT_MAX_LENGTH) -> torch.Tensor:
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
