"""What both routed predictors save alike: the pool of experts, the scoring settings, the manifest, the folder.

A saved routed predictor is a folder with ``manifest.json``, one sub-folder per expert under
``experts/`` and the router's tensors in ``router.safetensors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapterfuse.base import BaseModel
from adapterfuse.expert import Expert
from adapterfuse.head import Scoring
from adapterfuse.io.atomic import atomic_dir
from adapterfuse.io.manifest import Kind, member_folders, write_manifest

TENSORS, EXPERTS = "router.safetensors", "experts"


class SavedPool:
    """What both routed predictors share: the pool, the scoring settings, the manifest and the folder."""

    def _setup(
        self, base: BaseModel, pool: Sequence[Expert], name: str, info: dict[str, Any] | None, scoring: Scoring
    ) -> None:
        self.base, self.experts, self.name = base, list(pool), name
        self.names = [e.name for e in self.experts]
        self.info = dict(info or {})
        self.scoring = scoring

    def _settings(self, router: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        folders = member_folders(self.names, "expert")
        return {
            "router": router,
            "experts": [
                {"name": e.name, "folder": f, "task": e.task, "sha256": e.weights_sha256()}
                for e, f in zip(self.experts, folders, strict=True)
            ],
            "scoring": asdict(self.scoring),
            "info": self.info,
            **extra,
        }

    def _write(
        self, path: str | Path, kind: Kind, settings: dict[str, Any], tensors: dict[str, torch.Tensor], overwrite: bool
    ) -> None:
        with atomic_dir(path, overwrite) as tmp:
            (tmp / EXPERTS).mkdir()
            for expert, entry in zip(self.experts, settings["experts"], strict=True):
                (tmp / EXPERTS / entry["folder"]).mkdir()
                expert.write_into(tmp / EXPERTS / entry["folder"])
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
            write_manifest(tmp, kind, self.name, settings, self.base.record())
