"""The defaults and choices the command line shows for each backend's options, read from the config models.

The config models (``backends/*/config.py``) declare every default and choice once; importing them
imports torch, which would make ``--help`` take seconds. This module is a snapshot of what the help
needs from them, written by ``python -m adapterfuse.cli.fields`` (``make cli-fields``);
``tests/test_cli_help.py`` fails when it no longer matches the models. The models still validate every
value a command is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# backend -> option -> {"default": value, "choices": [names]}
FIELDS: dict[str, dict[str, dict[str, Any]]] = {
    "ensemble": {
        "autocast": {"choices": [], "default": True},
        "batch_size": {"choices": [], "default": 32},
        "max_length": {"choices": [], "default": 256},
        "max_validation_examples": {"choices": [], "default": None},
        "metric": {"choices": ["score", "nll"], "default": "score"},
        "name": {"choices": [], "default": None},
        "pooling": {"choices": ["linear", "log_linear"], "default": "log_linear"},
        "seed": {"choices": [], "default": 0},
        "select": {"choices": [], "default": None},
        "temperature": {"choices": [], "default": 1.0},
        "weights": {"choices": ["uniform", "learned"], "default": "uniform"},
    },
    "merge": {
        "autocast": {"choices": [], "default": True},
        "batch_size": {"choices": [], "default": 32},
        "lambda_grid": {"choices": [], "default": None},
        "method": {
            "choices": [
                "uniform",
                "task_arithmetic",
                "ties",
                "dare_linear",
                "dare_ties",
                "iso_c",
                "tsv",
                "knots",
                "greedy_soup",
                "learned",
                "regmean",
                "fisher",
            ],
            "default": "ties",
        },
    },
    "route": {
        "abstain": {"choices": [], "default": None},
        "autocast": {"choices": [], "default": True},
        "batch_size": {"choices": [], "default": 32},
        "budget": {"choices": [], "default": None},
        "cluster_temperature": {"choices": [], "default": 1.0},
        "clusters": {"choices": [], "default": None},
        "cv_folds": {"choices": [], "default": 5},
        "decision": {"choices": ["probability", "utility"], "default": "probability"},
        "emr": {"choices": [], "default": False},
        "epochs": {"choices": [], "default": 300},
        "fallback": {"choices": ["mix", "base"], "default": "mix"},
        "hidden": {"choices": [], "default": 0},
        "layer": {"choices": [], "default": 1},
        "lr": {"choices": [], "default": 0.01},
        "max_length": {"choices": [], "default": 256},
        "max_validation_examples": {"choices": [], "default": None},
        "mbc_clusters": {"choices": [], "default": None},
        "mbc_merge": {"choices": ["uniform", "task_arithmetic"], "default": "uniform"},
        "mbc_router": {"choices": ["learned", "clustered", "arrow"], "default": None},
        "name": {"choices": [], "default": None},
        "on": {"choices": ["prompt", "fields"], "default": "prompt"},
        "pca": {"choices": [], "default": None},
        "pooling": {"choices": ["linear", "log_linear"], "default": "linear"},
        "prior_weight": {"choices": [], "default": None},
        "readout": {"choices": ["mean", "mean_last"], "default": "mean"},
        "router": {"choices": ["learned", "clustered", "mbc", "arrow"], "default": "learned"},
        "seed": {"choices": [], "default": 0},
        "shape": {"choices": [], "default": None},
        "sketch": {"choices": [], "default": None},
        "subtract_mean": {"choices": [], "default": False},
        "target": {"choices": ["task", "best_expert", "likelihood", "task_prior"], "default": "task"},
        "temperature": {"choices": [], "default": 1.0},
        "then": {"choices": ["ensemble", "merge"], "default": "ensemble"},
        "top_k": {"choices": [], "default": 1},
    },
}


def read_models() -> dict[str, dict[str, dict[str, Any]]]:
    """:data:`FIELDS` read afresh from the config models (this imports torch).

    Returns:
        backend -> option -> its default and choices (merge: the method only; its parameters belong to
        each method's own model).
    """
    from pydantic_core import PydanticUndefined

    from adapterfuse.backends.base import BACKENDS
    from adapterfuse.backends.merge.config import DEFAULT_METHOD, all_methods
    from adapterfuse.backends.options import choices

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for backend, (model, _) in BACKENDS.items():
        table[backend] = {
            field: {"default": info.default, "choices": choices(info.annotation)}
            for field, info in model.model_fields.items()
            if info.default is not PydanticUndefined
        }
    table["merge"]["method"] = {"default": DEFAULT_METHOD, "choices": all_methods()}
    return table


def _write() -> None:
    """Rewrite :data:`FIELDS` in this file from the models (then ``ruff format`` it, as ``make cli-fields`` does)."""
    import pprint

    text = Path(__file__).read_text()
    marker = "FIELDS: dict[str, dict[str, dict[str, Any]]] = "
    head, _, rest = text.partition(marker)
    Path(__file__).write_text(head + marker + pprint.pformat(read_models(), width=110) + rest[rest.index("\n\n\n") :])


if __name__ == "__main__":
    _write()
