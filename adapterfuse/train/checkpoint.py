"""Checkpoints of a training run: the latest complete one and the one before it, in ``.<out>.partial/``.

:func:`~adapterfuse.train.loop.run_loop` writes one every ``checkpoint_every`` steps and resumes from
the latest complete one when the run's identity (config, base, data …) is unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from adapterfuse.errors import AdapterFuseWarning, ResumeError
from adapterfuse.io.atomic import save_error, write_bytes, write_failure, write_json


class _Broken(Exception):
    """A checkpoint file pair that is incomplete or corrupt (the reason is the message)."""


_CURRENT = ("checkpoint.pt", "state.json")
_PREVIOUS = ("previous.pt", "previous.json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Checkpoint:
    """The partial-run folder ``.<out>.partial/`` beside ``out``: what would be resumed, and the refusal
    when the run changed.

    It holds the latest checkpoint (``checkpoint.pt`` with ``state.json``, which records the step, the
    run's identity and the checkpoint's sha256) and the one before it (``previous.pt`` with
    ``previous.json``). A kill at any moment leaves at least one of the two pairs complete; a pair that is
    incomplete or corrupt (truncated, garbage, a file missing) is passed over with a warning.

    Args:
        out: the run's final output path.
        identity: what must match to resume (JSON-able; its ``config`` entry is compared key by key).
    """

    def __init__(self, out: Path, identity: dict[str, Any]) -> None:
        self.dir = out.with_name(f".{out.name}.partial")
        self.identity = identity
        self._written: dict[str, Any] | None = None  # the state this object wrote last (known complete)

    def _state(self, name: str) -> dict[str, Any]:
        try:
            state = json.loads((self.dir / name).read_text())
        except FileNotFoundError:
            raise _Broken(f"{name} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Broken(f"{name} is not valid JSON") from None
        if not isinstance(state, dict) or not isinstance(state.get("identity"), dict) or "step" not in state:
            raise _Broken(f"{name} lacks the run's identity or step")
        return state

    def _check_identity(self, saved: dict[str, Any]) -> None:
        config, saved_config = self.identity.get("config", {}), saved.get("config", {})
        changed = sorted(
            k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k) and k != "config"
        )
        changed += [
            f"config.{k}" for k in sorted(set(saved_config) | set(config)) if saved_config.get(k) != config.get(k)
        ]
        if changed:
            raise ResumeError(
                f"checkpoint {self.dir}: was made with a different {', '.join(changed)}; expected "
                "the same config, base and data to resume; remove that folder (or pass "
                "--overwrite) to start afresh"
            )

    def _read(self, weights: str, state_name: str) -> dict[str, Any]:
        """One pair's payload; :class:`_Broken` when it is incomplete or corrupt."""
        state = self._state(state_name)
        self._check_identity(state["identity"])
        try:
            data = (self.dir / weights).read_bytes()
        except FileNotFoundError:
            raise _Broken(f"{weights} is missing") from None
        if "sha256" in state and _sha256(data) != state["sha256"]:
            raise _Broken(f"{weights} does not match the sha256 in {state_name} (truncated or not fully written)")
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a damaged archive
            raise _Broken(f"{weights} cannot be read ({type(e).__name__})") from None
        if not isinstance(payload, dict) or payload.get("step") != state["step"]:
            raise _Broken(f"{weights} does not hold step {state['step']} recorded in {state_name}")
        return payload

    def load(self) -> dict[str, Any] | None:
        """The payload of the latest complete checkpoint, or ``None`` when there is none.

        When the latest is incomplete or corrupt, the previous one is used, with an
        :class:`~adapterfuse.errors.AdapterFuseWarning` naming what was wrong; when neither is usable the
        run starts from step 0, with a warning too.

        Raises:
            ResumeError: the checkpoint was made with another identity (names what changed).
        """
        problems: list[str] = []
        for weights, state in (_CURRENT, _PREVIOUS):
            if not (self.dir / weights).exists() and not (self.dir / state).exists():
                continue
            try:
                payload = self._read(weights, state)
            except _Broken as e:
                problems.append(str(e))
                continue
            if problems:
                warnings.warn(
                    f"checkpoint {self.dir}: {'; '.join(problems)}; resuming from the previous complete "
                    f"checkpoint at step {payload['step']}",
                    AdapterFuseWarning,
                    stacklevel=3,
                )
            return payload
        if problems:
            warnings.warn(
                f"checkpoint {self.dir}: no complete checkpoint ({'; '.join(problems)}); training starts from step 0",
                AdapterFuseWarning,
                stacklevel=3,
            )
        return None

    def _complete(self, weights: str, state_name: str) -> dict[str, Any] | None:
        """A pair's state when the pair is complete (its file matches the recorded hash), else ``None``."""
        try:
            state = self._state(state_name)
            data = (self.dir / weights).read_bytes()
        except (_Broken, FileNotFoundError):
            return None
        return state if state.get("sha256") == _sha256(data) else None

    def save(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` (it has a ``step``); the checkpoint it replaces is kept as the previous one.

        Each file goes through a temporary file and a rename, in an order that leaves one complete pair
        whenever the process is killed.

        Raises:
            SaveError: a file could not be written (the complete checkpoints already there are kept).
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise save_error(self.dir, write_failure(e) or str(e)) from e
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        current, self._written = self._written or self._complete(*_CURRENT), None
        if current is not None:  # keep it as the previous one: a hard link (or a copy), then the state beside it
            link = self.dir / f"{_PREVIOUS[0]}.tmp"
            link.unlink(missing_ok=True)
            try:
                os.link(self.dir / _CURRENT[0], link)
            except OSError:  # a file system without hard links
                shutil.copyfile(self.dir / _CURRENT[0], link)
            os.replace(link, self.dir / _PREVIOUS[0])
            write_json(self.dir / _PREVIOUS[1], current)
        write_bytes(self.dir / _CURRENT[0], data, fsync=True)
        state = {"identity": self.identity, "step": payload["step"], "sha256": _sha256(data)}
        write_json(self.dir / _CURRENT[1], state)
        self._written = state

    def clear(self) -> None:
        """Remove the folder (after the output is in place, or to start afresh)."""
        shutil.rmtree(self.dir, ignore_errors=True)
