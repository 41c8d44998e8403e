"""Where merge inputs come from: Expert objects, expert folders, Hub ids, or an ExpertLibrary.

Paths are checked for existence before any weight is read, so a typo fails at once; Hub ids
(``owner/name`` that is not an existing path) are downloaded into the Hugging Face cache first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError, ExpertError
from adapterfuse.expert import Expert
from adapterfuse.library import ExpertLibrary

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ExpertsInput = ExpertLibrary | Sequence[Expert | str | Path]
"""What :func:`~adapterfuse.merge.api.merge` accepts as ``experts``."""


def count_experts(experts: Any) -> int:
    """How many experts were given, without loading any (for early weight-count checks).

    Raises:
        ConfigError: if ``experts`` is not a library or a non-empty list.
    """
    if isinstance(experts, ExpertLibrary):
        return len(experts)
    if isinstance(experts, (str, Path, Expert)) or not isinstance(experts, Sequence) or not experts:
        raise ConfigError("experts: expected a non-empty list of Expert objects, expert folders or Hub ids, "
                          f"or an ExpertLibrary; got {type(experts).__name__}"
                          + (" (a single expert? wrap it in a list)" if isinstance(experts, (str, Path, Expert))
                             else ""))
    return len(experts)


def is_hub_id(item: str | Path) -> bool:
    """A string that is not an existing path and looks like ``owner/name``."""
    return isinstance(item, str) and not Path(item).expanduser().exists() and bool(_HUB_ID.match(item))


def check_sources(experts: Any) -> None:
    """Refuse items that are neither experts, existing folders nor Hub ids, before anything is read.

    Raises:
        ConfigError: an item of the wrong type.
        ExpertError: a path that does not exist and is not a Hub id.
    """
    if isinstance(experts, ExpertLibrary):
        return
    for i, item in enumerate(experts):
        if isinstance(item, Expert):
            continue
        if not isinstance(item, (str, Path)):
            raise ConfigError(f"experts[{i}]: expected an Expert, a folder path or a Hub id, got {type(item).__name__}")
        if not Path(item).expanduser().exists() and not is_hub_id(item):
            raise ExpertError(f"expert {str(item)!r}: folder not found and not a Hub id ('owner/name'); "
                              "expected a PEFT adapter folder")


def download(repo_id: str) -> Path:
    """Download an adapter repository from the Hub into the HF cache.

    Raises:
        ExpertError: when it cannot be fetched (offline, unknown repo, no access).
    """
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.md"]))
    except Exception as e:  # the Hub client raises many types (offline, 404, 401, timeouts)
        raise ExpertError(f"expert {repo_id!r}: could not download it from the Hugging Face Hub "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the id and "
                          "your network, or pass a local adapter folder") from None


def load_one(item: Expert | str | Path, allow_pickle: bool) -> Expert:
    """An :class:`Expert` from an expert, a folder or a Hub id."""
    if isinstance(item, Expert):
        return item
    if is_hub_id(item):
        return Expert.load(download(str(item)), name=str(item), allow_pickle=allow_pickle)
    return Expert.load(Path(item).expanduser(), allow_pickle=allow_pickle)


def load_library(experts: Any, base: BaseModel | None = None, allow_pickle: bool = False) -> ExpertLibrary:
    """Load and check the experts together (the library's compatibility check).

    Args:
        experts: an :class:`ExpertLibrary`, or a list of experts, folders and Hub ids.
        base: when given, every expert that records a base fingerprint must match it.
        allow_pickle: accept ``adapter_model.bin`` files (loaded with ``weights_only``).

    Returns:
        The checked library.

    Raises:
        ConfigError, ExpertError, CompatibilityError: see :class:`ExpertLibrary`.
    """
    fingerprint = base.fingerprint if base is not None else None
    if isinstance(experts, ExpertLibrary):
        experts.check(fingerprint)
        return experts
    count_experts(experts)
    check_sources(experts)
    return ExpertLibrary([load_one(item, allow_pickle) for item in experts], fingerprint)
