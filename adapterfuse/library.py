"""ExpertLibrary: named experts over one base, and the single compatibility check."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.expert import Expert


class ExpertLibrary:
    """A set of experts that can be combined: same base, finite weights, consistent configs.

    Args:
        experts: the experts; names must be unique.
        base_fingerprint: if given, every expert that recorded a fingerprint must match it.

    Raises:
        ConfigError: no experts, or repeated names.
        CompatibilityError / ExpertError: see :meth:`check`.
    """

    def __init__(self, experts: Sequence[Expert], base_fingerprint: str | None = None) -> None:
        if not experts:
            raise ConfigError("experts: expected at least one expert, got none")
        names = [e.name for e in experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"experts: names must be unique, got {dupes} more than once; rename the folders")
        self.experts = list(experts)
        self.notes: list[str] = []
        self.check(base_fingerprint)

    @classmethod
    def load(cls, paths: Sequence[str | Path], base_fingerprint: str | None = None,
             allow_pickle: bool = False) -> ExpertLibrary:
        """Load expert folders and check them together (see :meth:`check`)."""
        return cls([Expert.load(p, allow_pickle=allow_pickle) for p in paths], base_fingerprint)

    def __iter__(self) -> Iterator[Expert]:
        return iter(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(f"no expert named {name!r}; have {[e.name for e in self.experts]}")

    def by_task(self) -> dict[str, list[Expert]]:
        """Experts grouped by the task they were trained on (unknown task: key ``None``)."""
        out: dict[str, list[Expert]] = {}
        for e in self.experts:
            out.setdefault(e.task, []).append(e)
        return out

    def check(self, base_fingerprint: str | None = None) -> None:
        """The one compatibility check every backend relies on.

        Each expert must be finite and LoRA-family; all must share one base (the recorded fingerprint,
        or, for plain PEFT folders without one, the base name and the module shapes, which is weaker
        and is noted in ``self.notes``); a module must have one ΔW shape across experts.

        Raises:
            ExpertError: an expert with NaN/inf weights or a non-LoRA config.
            CompatibilityError: naming the two experts and the field that differs.
        """
        for e in self.experts:
            e.validate()
        ref = self.experts[0]
        want = base_fingerprint or ref.base_fingerprint
        for e in self.experts:
            got = e.base_fingerprint
            if got is not None and want is not None and got != want:
                raise CompatibilityError(
                    f"expert {e.name!r}: base fingerprint {got[:19]}… differs from {want[:19]}… "
                    f"({'the loaded base' if base_fingerprint else repr(ref.name)}); experts must be trained "
                    "on the same base model")
            if got is None:
                if e.base_name != ref.base_name:
                    raise CompatibilityError(f"expert {e.name!r}: base_model_name_or_path {e.base_name!r} differs "
                                             f"from {ref.base_name!r} of expert {ref.name!r}")
                self.notes.append(f"expert {e.name!r} records no base fingerprint; compatibility checked by base "
                                  f"name {e.base_name!r} and module shapes only")
        shapes: dict[str, tuple[tuple[int, int], str]] = {}
        for e in self.experts:
            for module, d in e.deltas.items():
                seen = shapes.setdefault(module, (d.shape, e.name))
                if seen[0] != d.shape:
                    raise CompatibilityError(f"module {module!r}: expert {e.name!r} has ΔW shape {d.shape}, "
                                             f"expert {seen[1]!r} has {seen[0]}; experts must share one base")
