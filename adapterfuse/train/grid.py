"""Hyperparameter ensembles: one expert per point of a grid of training settings, for one task.

Members that differ in learning rate, rank, dropout or seed make a more diverse ensemble than seeds
alone (Wenzel et al. 2020, https://arxiv.org/abs/2006.13570). Every grid point is checked by
:class:`~adapterfuse.train.config.TrainConfig` before anything is trained; members are trained one after
the other into ``out/<member name>``, and a finished member is reused when the same grid is run again.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.tasks.spec import TaskData, TaskSpec
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.expert import train_expert


def grid_configs(config: TrainConfig, grid: Mapping[str, Sequence[Any]]) -> list[tuple[str, TrainConfig]]:
    """Every combination of the grid's values over ``config``, with a folder name for each.

    Args:
        config: the settings shared by every member.
        grid: ``{TrainConfig field: [values]}``; fields in sorted order, values in the order given.

    Returns:
        ``[(name, config)]``, e.g. ``("lr0.001-rank4", …)``.

    Raises:
        ConfigError: an empty grid, an empty or repeated value list, an unknown field or an invalid value.
    """
    if not grid:
        raise ConfigError("grid: expected at least one field with values, e.g. {'lr': [1e-3, 3e-3]}")
    fields = sorted(grid)
    for name in fields:
        values = list(grid[name])
        if name not in TrainConfig.model_fields:
            raise ConfigError(f"grid field {name!r}: not a training setting; expected one of TrainConfig's fields")
        if not values or len(set(map(repr, values))) != len(values):
            raise ConfigError(f"grid field {name!r}: expected distinct values, got {values!r}")
    out = []
    for combo in itertools.product(*(list(grid[f]) for f in fields)):
        update = dict(zip(fields, combo, strict=True))
        try:
            member = TrainConfig.model_validate({**config.model_dump(), **update})
        except ValidationError as exc:
            raise ConfigError(f"grid point {update}: {exc.errors()[0]['msg']}") from None
        out.append(("-".join(f"{k}{v}" for k, v in update.items()), member))
    return out


def train_grid(
    base: BaseModel,
    task: TaskSpec | str,
    config: TrainConfig,
    grid: Mapping[str, Sequence[Any]],
    out: str | Path,
    data: TaskData | None = None,
    progress: bool = True,
) -> list[Expert]:
    """Train one expert per grid point into ``out/<name>``; a finished member is loaded, not retrained.

    Args:
        base: the frozen base.
        task: the task.
        config: the shared settings.
        grid: see :func:`grid_configs`.
        out: the folder holding the members.
        data: the task's splits (loaded per member's config when omitted).
        progress: show each member's training bar.

    Returns:
        The members, in grid order.

    Raises:
        ConfigError: see :func:`grid_configs` (before anything is trained).
    """
    members = grid_configs(config, grid)
    root = Path(out)
    experts = []
    for name, member in members:
        folder = root / name
        if (folder / "adapterfuse.json").is_file():
            experts.append(Expert.load(folder))
            continue
        experts.append(train_expert(base, task, member, out=folder, data=data, progress=progress))
    return experts
