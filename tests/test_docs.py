"""The public API's docstrings: every function and class has a short example, and every
example names real circuitkit functions with arguments their signatures accept."""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

import pytest

import circuitkit as ck


def public_api() -> dict[str, object]:
    """``ck.__all__``'s functions and classes, and the public functions and classes of its
    modules (``ck.metrics``, ``ck.provenance``, ...), by dotted name."""
    found: dict[str, object] = {}
    for name in ck.__all__:
        obj = getattr(ck, name)
        if isinstance(obj, types.ModuleType):
            for member_name, member in vars(obj).items():
                if member_name.startswith("_"):
                    continue
                if not (inspect.isfunction(member) or inspect.isclass(member)):
                    continue
                if getattr(member, "__module__", "").startswith(obj.__name__):
                    found.setdefault(f"{name}.{member_name}", member)
        elif inspect.isfunction(obj) or inspect.isclass(obj):
            found.setdefault(name, obj)
    return found


def examples(doc: str) -> list[str]:
    """The code of each ``Example::`` block (its indented lines) and each ``>>>`` block."""
    blocks = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() in ("Example::", "Examples::"):
            indent = len(line) - len(line.lstrip())
            block = []
            i += 1
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(block)).strip())
        elif line.strip().startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                stripped = lines[i].strip()
                if stripped.startswith((">>> ", "... ")):
                    block.append(stripped[4:])
                i += 1
            blocks.append("\n".join(block))
        else:
            i += 1
    return [block for block in blocks if block]


API = public_api()
EXAMPLES = [
    pytest.param(code, id=f"{name}-{k}")
    for name, obj in API.items()
    for k, code in enumerate(examples(inspect.getdoc(obj) or ""))
]


def test_the_api_is_large_enough_to_mean_something():
    # guards the collection itself: a broken walk of the API would make the tests below vacuous
    assert len(API) > 80 and len(EXAMPLES) > 80
    assert {"activation_patching", "Head", "metrics.logit_diff", "Result"} <= set(API)


@pytest.mark.parametrize("name", sorted(API))
def test_every_public_function_and_class_has_an_example(name):
    assert examples(inspect.getdoc(API[name]) or ""), f"{name}'s docstring has no example"


def _resolve(node: ast.expr) -> object | None:
    """The circuitkit object ``ck.a.b`` names, or None for anything else; raises
    AttributeError for a ``ck.`` name that does not exist."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id == "ck") or not parts:
        return None
    obj: object = ck
    for part in reversed(parts):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("code", EXAMPLES)
def test_examples_call_real_functions_with_accepted_arguments(code):
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            _resolve(node)  # every ck.name exists
        if not isinstance(node, ast.Call):
            continue
        target = _resolve(node.func)
        if target is None or not callable(target):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        ):
            continue
        signature = inspect.signature(target)
        args = [object()] * len(node.args)
        kwargs = {k.arg: object() for k in node.keywords}
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            pytest.fail(f"{ast.unparse(node)}: {error} (signature {signature})")


def test_the_argument_check_catches_a_wrong_keyword():
    with pytest.raises(pytest.fail.Exception, match="unexpected keyword"):
        test_examples_call_real_functions_with_accepted_arguments(
            "ck.activation_patching(model, ds, abc, 'head', per_positoin=True)"
        )
    with pytest.raises(AttributeError):
        test_examples_call_real_functions_with_accepted_arguments("ck.activation_pathcing()")


def test_all_names_each_public_object_once():
    assert len(ck.__all__) == len(set(ck.__all__))
    assert all(hasattr(ck, name) for name in ck.__all__)
