"""Validating a backend's options with its pydantic config model, with one-line errors.

Every backend (merge, ensemble, route) declares its options once, as a frozen pydantic model that
refuses unknown keys. :func:`validate_options` builds that model from keyword options (the API, the
CLI and a recipe all call it), and turns pydantic's error list into one :class:`ConfigError` line that
names the option, what was expected and what was given.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from adapterfuse.errors import ConfigError

Config = TypeVar("Config", bound=BaseModel)

MAX_SEED = 2**32 - 1
"""The largest seed any config accepts (seeds are ``0 .. MAX_SEED``, what numpy's and torch's generators take)."""

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "too_short": "a non-empty list",
}
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def choices(annotation: Any) -> list[str]:
    """The strings of every ``Literal`` inside an annotation (``Literal[...] | None`` included)."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return [c for arg in typing.get_args(annotation) for c in choices(arg)]


def _describe(model: type[BaseModel], backend: str, err: Mapping[str, Any]) -> str:
    """One pydantic error as ``option: expected …, got …`` (a validator's own message is kept as written)."""
    kind, name = err["type"], str(err["loc"][0]) if err["loc"] else ""
    if kind == "value_error":  # our validators write whole messages that name the option themselves
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return (
            f"{name}: unknown {backend} option; expected one of {', '.join(sorted(model.model_fields))} "
            "(check the spelling)"
        )
    if kind == "literal_error" and name in model.model_fields:
        known = choices(model.model_fields[name].annotation)
        return f"{name} {err['input']!r}: unknown; expected one of {', '.join(known)}"
    if kind in _BOUNDS:
        sign, key = _BOUNDS[kind]
        bound = err["ctx"][key]
        what = f"{'an integer' if isinstance(bound, int) else 'a number'} {sign} {bound}"
    else:
        what = _EXPECTED.get(kind, str(err["msg"]).removeprefix("Input should be ").lower())
    return f"{name}: expected {what}, got {err['input']!r}"


def validate_options(model: type[Config], options: Mapping[str, Any], backend: str) -> Config:
    """Build a backend's config model from keyword options.

    Args:
        model: the backend's config model.
        options: the options as given (``route(..., top_k=2)``, a recipe's ``options``, parsed CLI flags).
        backend: the backend's name, for messages.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: one line naming each bad option (the first error per option), the expected and the
            given value.
    """
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        seen: dict[str, str] = {}
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            seen.setdefault(key, _describe(model, backend, err))
        raise ConfigError("; ".join(seen.values())) from None


def given_or_built(
    model: type[Config], config: Config | None, options: Mapping[str, Any], backend: str, example: str
) -> Config:
    """The config given, or one built from keyword options (not both).

    Args:
        model: the backend's config model.
        config: a config the caller built, or ``None``.
        options: keyword options (used only when ``config`` is ``None``).
        backend: the backend's name, for messages.
        example: an option to show in the fix (e.g. ``"method"``).

    Returns:
        The validated config.

    Raises:
        ConfigError: both given, a config of another type, or a bad option.
    """
    if config is None:
        return validate_options(model, options, backend)
    if not isinstance(config, model):
        article = "an" if model.__name__[0] in "AEIOU" else "a"
        raise ConfigError(
            f"config: expected {article} {model.__name__} or None, got {config!r}; give the options as keywords "
            f"instead (e.g. {example}=...)"
        )
    if options:
        raise ConfigError(
            f"{backend}: got a config and the options {sorted(options)}; give one or the other "
            "(config.model_copy(update=...) changes a config)"
        )
    return config
