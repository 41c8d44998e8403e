"""MIMO (Havasi et al. 2021) on a frozen causal LM: K inputs in one sequence, K answers out.

The variant chosen here is the "multi-input" one that a causal LM can express without new heads:
K independent prompts are packed into one sequence, separated by a short text (``"\\n\\n"``), and each
prompt is answered at its own last token, read off the label words as everywhere else. One shared LoRA
is trained on such packs, with the K slots filled by independent permutations of the step's batch
(the paper's independent inputs), and the loss is the mean of the K slots' losses. Slot ``j``'s answer
is member ``j``: it sees the earlier slots' prompts (causal attention), so the shared adapter learns
to answer slot ``j`` from its own prompt while the others act as noise, which is where the members'
diversity comes from. At test time the same prompt fills all K slots and the K answers are pooled.
The cost is one forward pass over a K-times longer sequence per input.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from adapterfuse.head import causal_lm, read_labels


def pack(
    slots: Sequence[Sequence[Sequence[int]]], separator: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack K token lists per row into one right-padded sequence.

    Args:
        slots: ``slots[j][i]``: the tokens of row ``i``'s prompt in slot ``j``.
        separator: tokens placed between slots.
        pad_id: the pad token.

    Returns:
        ``(input_ids [n, T], attention_mask [n, T], positions [K, n])``; ``positions[j, i]`` is the
        index of the last token of row ``i``'s slot ``j`` (where its answer is read).
    """
    k, n = len(slots), len(slots[0])
    rows, positions = [], torch.zeros((k, n), dtype=torch.long)
    for i in range(n):
        seq: list[int] = []
        for j in range(k):
            if j:
                seq += list(separator)
            seq += list(slots[j][i])
            positions[j, i] = len(seq) - 1
        rows.append(seq)
    width = max(len(r) for r in rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask, positions


def slot_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    label_ids: Sequence[int],
) -> torch.Tensor:
    """Label-word logits at each slot's answer position, fp32 ``[K, n, n_labels]``.

    Args:
        model: the adapted causal LM.
        input_ids: ``[n, T]`` packed rows.
        attention_mask: ``[n, T]``.
        positions: ``[K, n]`` answer positions (see :func:`pack`).
        label_ids: the label words' token ids.
    """
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    h = torch.stack([hidden[rows, p.to(hidden.device)] for p in positions]).float()  # [K, n, d]
    return read_labels(lm, h, label_ids)


def slot_rows(rows: Sequence[int], k: int, seed: int, step: int, repeat: float = 0.0) -> list[list[int]]:
    """The example indices of each slot for one training step.

    Slot 0 takes the batch as scheduled; slots 1..K-1 take seeded permutations of it, so the K inputs
    of a pack are (mostly) different examples, as MIMO's independent inputs require. With ``repeat``
    (the paper's input repetition), each row instead holds its slot-0 example in every slot with that
    probability: at test time every slot holds the same prompt, so these rows train what is asked then.

    Returns:
        ``k`` lists of ``len(rows)`` indices.
    """
    rng = random.Random(f"{seed}:mimo:{step}")
    out = [list(rows)]
    for _ in range(1, k):
        perm = list(rows)
        rng.shuffle(perm)
        out.append(perm)
    if repeat > 0:  # drawn after the permutations, so repeat=0 packs what it always packed
        same = [rng.random() < repeat for _ in rows]
        out[1:] = [[rows[i] if same[i] else slot[i] for i in range(len(rows))] for slot in out[1:]]
    return out
