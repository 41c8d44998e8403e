"""How much adapterfuse says while it works: progress bars and one-line status messages, on stderr.

Every step longer than a few seconds (training, fits, feature passes, evaluation) reports through
``bar``; every recipe step through ``status``. The CLI's ``-q`` and ``-v`` set the level; library
users call ``set_verbosity``. Output goes to stderr so that stdout stays for results.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Verbosity = Literal["quiet", "normal", "verbose"]
_ORDER: dict[Verbosity, int] = {"quiet": 0, "normal": 1, "verbose": 2}
_level: Verbosity = "normal"


def set_verbosity(level: Verbosity) -> None:
    """Set how much is reported: ``quiet`` (errors only), ``normal`` (bars and status), ``verbose``.

    Raises:
        ValueError: ``level`` is not one of the three.
    """
    global _level
    if level not in _ORDER:
        raise ValueError(f"verbosity must be one of {sorted(_ORDER)}, got {level!r}")
    _level = level


def verbosity() -> Verbosity:
    """The current level."""
    return _level


def shows(level: Verbosity = "normal") -> bool:
    """Whether messages of ``level`` are shown at the current verbosity."""
    return _ORDER[_level] >= _ORDER[level]


def status(message: str, level: Verbosity = "normal") -> None:
    """Print one status line on stderr when ``level`` is shown."""
    if shows(level):
        print(message, file=sys.stderr, flush=True)


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar (with rate and ETA) on stderr, hidden when quiet.

    Args:
        iterable: what to iterate over.
        desc: the bar's title, e.g. ``"features sst2"``.
        total: the number of items when ``iterable`` has no length.
        unit: the name of one item.

    Returns:
        An iterator over ``iterable``'s items.
    """
    return iter(tracker(iterable, desc, total=total, unit=unit))


def tracker(
    iterable: Iterable[T] | None,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
) -> Any:
    """A progress bar object, for loops that report more than their count (a loss, a resumed start).

    Args:
        iterable: what to iterate over; ``None`` for a bar moved by hand with ``update(n)``.
        desc: the bar's title.
        total: the number of items when ``iterable`` has no length (or is ``None``).
        unit: the name of one item.
        initial: items already done (a resumed run).
        enabled: ``False`` hides the bar whatever the verbosity (a caller asked for none, or a process
            other than the main one).

    Returns:
        A ``tqdm`` bar (iterate over it; ``set_postfix``, ``update``, ``close``), hidden when quiet.
    """
    from tqdm.auto import tqdm

    return tqdm(
        iterable, desc=desc, total=total, unit=unit, initial=initial, disable=not (enabled and shows()), leave=False
    )
