"""Errors raised by adapterfuse.

Every error is a ``ValueError`` subclass so callers that already catch ``ValueError`` keep working,
and every message names the thing at fault, what was expected, what was found and how to fix it.
"""

from __future__ import annotations


class AdapterFuseError(ValueError):
    """Base class of every error adapterfuse raises on purpose."""


class ConfigError(AdapterFuseError):
    """A configuration or argument has a wrong key, type or value."""


class DataError(AdapterFuseError):
    """A task's data is missing, unreadable or malformed."""


class BaseModelError(AdapterFuseError):
    """A base model spec cannot be resolved or loaded."""


class ExpertError(AdapterFuseError):
    """An expert folder is missing files, corrupt, unsafe or inconsistent."""


class CompatibilityError(AdapterFuseError):
    """Experts cannot be combined (different bases, shapes or adapter types)."""


class OutputExistsError(AdapterFuseError):
    """An output folder exists already and ``overwrite`` was not given."""


class ResumeError(AdapterFuseError):
    """A checkpoint cannot be resumed because its config or base changed."""


class SaveError(AdapterFuseError, OSError):
    """An output could not be written (disk full, no permission …); nothing half-written is left.

    Also an ``OSError``, so callers that already catch ``OSError`` around a save keep working.
    """


class AdapterFuseWarning(UserWarning):
    """Something was recovered or skipped and the run went on (a checkpoint fallen back to, debris
    removed, malformed rows skipped); the message says what and where."""
