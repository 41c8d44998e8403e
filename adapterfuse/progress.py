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

    ``quiet`` also hides the bars transformers and huggingface_hub draw (loading weights, downloads).

    Raises:
        ValueError: ``level`` is not one of the three.
    """
    global _level
    if level not in _ORDER:
        raise ValueError(f"verbosity must be one of {sorted(_ORDER)}, got {level!r}")
    if level == "quiet" or _level == "quiet":
        _show_library_bars(level != "quiet")
    _level = level


def _show_library_bars(show: bool) -> None:
    """Show or hide the bars the Hugging Face libraries draw themselves (downloads, loading weights)."""
    # transformers copies the hub's setting when imported, then keeps its own flag (and sets the hub's too).
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
        return
    from huggingface_hub import utils as hub_utils

    (hub_utils.enable_progress_bars if show else hub_utils.disable_progress_bars)()


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
