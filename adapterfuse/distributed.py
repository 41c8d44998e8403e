"""Several processes: evaluation and fitting split over inputs under ``accelerate launch`` (or ``torchrun``).

Under a multi-process launch every process runs the same program on the same data, each with the base
on its own device. The forward passes over inputs are the work worth sharing: :func:`map_rows` gives
each process every world-th input, runs the function on that share and gathers the rows back, in
their order, on every process. So every process goes on with the same numbers (a λ, a soup or
ensemble weights chosen on validation are the same everywhere), and only the main process writes
files or prints (:func:`is_main`). A call inside another (a predictor's own passes within an
evaluation that is already split by input) runs on the process's share as it is.

With one process nothing is split and nothing is gathered: the numbers are those of a plain run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
_depth = 0  # how many map_rows calls are running in this process (only the outermost splits)


def world() -> tuple[int, int]:
    """``(this process's rank, number of processes)``; ``(0, 1)`` outside a multi-process launch.

    The launcher's ``WORLD_SIZE`` decides; the process group is then joined through accelerate (once:
    its state is shared with the training loop's ``Accelerator``), over gloo on CPUs and NCCL on GPUs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes


def is_main() -> bool:
    """Whether this is the process that writes outputs and prints results (rank 0, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait until every process gets here (nothing with one process)."""
    if world()[1] > 1:
        import torch.distributed

        torch.distributed.barrier()


@contextmanager
def _inside() -> Iterator[None]:
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def map_rows(fn: Callable[[list[T]], torch.Tensor], items: Sequence[T], dim: int = 0) -> torch.Tensor:
    """``fn(items)``, with the items split over the processes and the rows gathered back in order.

    Process ``r`` of ``w`` computes ``fn(items[r::w])``; the parts are gathered on every process and
    interleaved back, so the result is indexed like ``items`` along ``dim``.

    Args:
        fn: one row (along ``dim``) of output per item, for any sublist of ``items`` (an empty one too).
        items: the inputs.
        dim: the dimension of ``fn``'s output that runs over the items.

    Returns:
        ``fn(items)``'s rows, on the CPU when gathered (as returned by ``fn`` with one process).
    """
    items = list(items)
    rank, size = world()
    if size == 1 or _depth > 0:
        return fn(items)
    import torch
    import torch.distributed

    with _inside():
        part = fn(items[rank::size]).detach().cpu()
    parts: list[torch.Tensor | None] = [None] * size
    torch.distributed.all_gather_object(parts, part)
    shape = list(part.shape)
    shape[dim] = len(items)
    out = part.new_empty(shape)
    for r, p in enumerate(parts):
        assert p is not None
        out.index_copy_(dim, torch.arange(r, len(items), size), p)
    return out
