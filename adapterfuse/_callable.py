"""Make a backend package callable: ``adapterfuse.merge(experts, ...)`` while ``adapterfuse.merge.functional``
stays importable. The design names each backend both as a package and as its API function."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_callable(module_name: str, fn: Callable[..., Any]) -> None:
    """Calling the module ``module_name`` calls ``fn`` (its docstring and signature are shown by help())."""

    class _CallableModule(types.ModuleType):
        __call__ = staticmethod(fn)

    module = sys.modules[module_name]
    module.__class__ = _CallableModule
