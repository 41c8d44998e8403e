"""Model surgery: find the base's linear modules by name.

"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def linear_modules(model: nn.Module, suffixes: Sequence[str] | None = None) -> list[str]:
    """Names of the decoder's ``nn.Linear`` modules (the LM head excluded), optionally by name suffix.

    Args:
        model: a causal LM.
        suffixes: keep only modules whose last name part is one of these (e.g. ``("q_proj", "v_proj")``).

    Returns:
        The module names, in model order.
    """
    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head
            and (suffixes is None or name.rpartition(".")[2] in suffixes)]
