"""docs/api.md against the code: every public name is documented, every documented signature is the code's.

A ``signatures`` block (see tests/docs_blocks.py) holds optional import lines, then statements
``name(params) -> type`` or ``name: type``. Each call-like statement is compared with
``inspect.signature`` of the object it names: the same parameters in the same order and kind, the same
defaults (evaluated in the object's module, so ``256`` matches ``DEFAULT_MAX_LENGTH``), the same
annotations and return annotation (as written in the code).
"""

from __future__ import annotations

import ast
import inspect
import sys
from typing import Any

import pytest

import adapterfuse
from tests.docs_blocks import PAGES, ROOT, Block, blocks, statements

API = ROOT / "docs" / "api.md"
SIGNATURE_BLOCKS = [b for page in PAGES for b in blocks(page) if b.marker == "signatures"]
EMPTY = inspect.Parameter.empty


def _normal(code: str) -> str:
    return ast.unparse(ast.parse(code, mode="eval"))


def _resolve(name: str, namespace: dict[str, Any]) -> Any:
    head, *rest = name.split(".")
    obj = namespace[head] if head in namespace else getattr(adapterfuse, head)
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _module_globals(obj: Any) -> dict[str, Any]:
    target = inspect.unwrap(obj.__func__ if inspect.ismethod(obj) else obj)
    module = sys.modules[target.__module__]
    return {**vars(module), **getattr(target, "__globals__", {})}


def _annotation(value: Any) -> str:
    if value is EMPTY:
        return ""
    return _normal(value) if isinstance(value, str) else inspect.formatannotation(value)


def _compare(where: str, name: str, documented: ast.arguments, returns: ast.expr | None, obj: Any) -> list[str]:
    code = inspect.signature(obj)
    doc_params = _documented_params(documented)
    problems = []
    if [(p[0], p[1]) for p in doc_params] != [(p.name, p.kind) for p in code.parameters.values()]:
        problems.append(
            f"{where}: {name} parameters {[p[0] for p in doc_params]}, the code has {list(code.parameters)}"
        )
        return problems
    scope = _module_globals(obj)
    for (pname, _, ann, default), param in zip(doc_params, code.parameters.values(), strict=True):
        if (ann or "") != _annotation(param.annotation) and ann is not None:
            problems.append(f"{where}: {name}({pname}: {ann}), the code has {_annotation(param.annotation)!r}")
        if (default is None) != (param.default is EMPTY):
            problems.append(f"{where}: {name}({pname}) default {default}, the code has {param.default!r}")
        elif default is not None and eval(default, scope) != param.default:
            problems.append(f"{where}: {name}({pname}={default}), the code has {param.default!r}")
    if returns is not None and _normal(ast.unparse(returns)) != _annotation(code.return_annotation):
        problems.append(f"{where}: {name} -> {ast.unparse(returns)}, the code has {code.return_annotation!r}")
    return problems


def _documented_params(args: ast.arguments) -> list[tuple[str, Any, str | None, str | None]]:
    """``(name, kind, annotation, default source)`` of each documented parameter, in order."""
    kind = inspect.Parameter
    positional = [(a, kind.POSITIONAL_ONLY) for a in args.posonlyargs] + [
        (a, kind.POSITIONAL_OR_KEYWORD) for a in args.args
    ]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    found = [(a, k, d) for (a, k), d in zip(positional, defaults, strict=True)]
    if args.vararg:
        found.append((args.vararg, kind.VAR_POSITIONAL, None))
    found += [(a, kind.KEYWORD_ONLY, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg:
        found.append((args.kwarg, kind.VAR_KEYWORD, None))
    return [
        (a.arg, k, _normal(ast.unparse(a.annotation)) if a.annotation else None, ast.unparse(d) if d else None)
        for a, k, d in found
    ]


def _check_block(block: Block) -> list[str]:
    namespace: dict[str, Any] = {"adapterfuse": adapterfuse}
    problems = []
    for statement in statements(block.text):
        if statement.startswith(("from ", "import ")):
            exec(statement, namespace)
            continue
        head = statement.split("(", 1)[0].split(":", 1)[0].strip()
        try:
            obj = _resolve(head, namespace)
        except (AttributeError, KeyError):
            problems.append(f"{block.where}: {head} does not exist")
            continue
        if "(" not in statement.split(":", 1)[0]:  # "NAME: type": the name exists, that is all
            continue
        call, _, returns = statement.partition(") ->")
        source = f"def f({call.split('(', 1)[1]}{')' if returns else ''}" + (f" -> {returns}" if returns else "")
        tree = ast.parse(source.rstrip() + ": ...")
        fn = tree.body[0]
        problems += _compare(block.where, head, fn.args, fn.returns, obj)
    return problems


@pytest.mark.parametrize("block", SIGNATURE_BLOCKS, ids=lambda b: b.where)
def test_documented_signatures_are_the_code_s(block):
    problems = _check_block(block)
    assert not problems, "\n".join(problems)


def test_every_public_name_is_documented():
    text = API.read_text(encoding="utf-8")
    signed = {s.split("(", 1)[0].split(":", 1)[0].strip() for b in SIGNATURE_BLOCKS for s in statements(b.text)}
    forms = ("`{}`", "`adapterfuse.{}`", "{}(")
    missing = [n for n in adapterfuse.__all__ if n not in signed and not any(f.format(n) in text for f in forms)]
    assert not missing, f"docs/api.md does not document {missing}"
    assert len(SIGNATURE_BLOCKS) >= 10  # the reference is made of them; losing the markers would skip the check
