"""Past eight parameters a function takes its stage's config: no featx function has more, except the public
keyword functions (featx._API: users call them with keywords), the scikit-learn estimators' constructors
(scikit-learn reads an estimator's parameters from its __init__) and the config field factory
(featx.core.configs.option)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from sklearn.base import BaseEstimator

import featx
from featx.core import configs

LIMIT = 8
PACKAGE = Path(featx.__file__).parent


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> int:
    """Every parameter, *args and **kwargs included; a method's self or cls is not counted."""
    a = node.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, [a.vararg, a.kwarg])]
    return len(names) - (1 if method and a.args and a.args[0].arg in ("self", "cls") else 0)


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node, is a method) of every function, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node, bool(prefix) and not prefix.endswith("<locals>.")
            yield from _functions(node, f"{prefix}{node.name}.<locals>.")


def _where(obj) -> tuple[str, str]:
    return Path(inspect.getsourcefile(obj)).relative_to(PACKAGE).as_posix(), obj.__qualname__


def _exempt() -> set[tuple[str, str]]:
    exempt = {_where(configs.option)}
    for name in featx._API:
        obj = getattr(featx, name)
        if inspect.isfunction(obj):
            exempt.add(_where(obj))
        elif inspect.isclass(obj) and issubclass(obj, BaseEstimator):
            exempt.add(_where(obj.__init__))
    return exempt


def _too_long() -> dict[tuple[str, str], int]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        for name, node, method in _functions(ast.parse(path.read_text())):
            n = _parameters(node, method)
            if n > LIMIT:
                found[where, name] = n
    return found


def test_no_function_takes_more_than_eight_parameters_but_the_listed_kinds():
    too_long, exempt = _too_long(), _exempt()
    offenders = {f"{path}:{name} ({n})" for (path, name), n in too_long.items() if (path, name) not in exempt}
    assert not offenders, f"more than {LIMIT} parameters: take the stage's config instead: {sorted(offenders)}"


def test_the_exemptions_are_the_long_functions_they_name():
    # Each kind of exemption is in use, so none of them is a hole that lets anything through.
    too_long = _too_long()
    assert ("core/configs.py", "option") in too_long
    assert ("probe/estimator.py", "LinearProbeCV.__init__") in too_long
    assert ("probe/run.py", "run_probe") in too_long
    assert ("probe/run.py", "probe") not in too_long  # the config-taking stage behind run_probe
    assert all(key in _exempt() for key in too_long)


def test_the_parameter_count_counts_every_kind():
    source = "def f(a, /, b, *c, d, **e): pass\nclass K:\n    def m(self, a, b): pass\n"
    counted = {name: _parameters(node, method) for name, node, method in _functions(ast.parse(source))}
    assert counted == {"f": 5, "K.m": 2}
