"""Task lookup: built-in names, user registrations and "package.module:function" specs.

Everything that accepts a task (CLI, meta-training, evaluation) goes through `resolve`, so a user's own
task is a plain function returning a Task or TaskFamily, with no registration step needed.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from .builtin import builtin_factories
from .core import Task, TaskError, TaskFamily, UnknownTaskError

_REGISTRY: dict[str, tuple[Callable[[], Task | TaskFamily], str]] = dict(builtin_factories())
_IDENT = r"[A-Za-z_]\w*"
_MODULE_SPEC = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}$")


def register(name: str, factory: Callable[[], Task | TaskFamily], description: str = "") -> None:
    """Register a task (or family) factory under `name`; it is called on every lookup."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise TaskError(f"invalid task name {name!r}: use a non-empty name without surrounding spaces")
    _REGISTRY[name] = (factory, description)


def names() -> list[str]:
    """All registered task names, sorted (built-ins include their shifted and held-out variants)."""
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    """One-line description of a registered task."""
    _check_known(name)
    return _REGISTRY[name][1]


def _known() -> str:
    return ", ".join(names())


def _check_known(name: str) -> None:
    if name not in _REGISTRY:
        raise UnknownTaskError(
            f"unknown task {name!r}; known tasks: {_known()} "
            "(or give a 'package.module:function' returning a Task or TaskFamily)"
        )


def _load_spec(spec: str) -> Task | TaskFamily:
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TaskError(
            f"cannot import module {module_name!r} for task {spec!r}: {err}; known tasks: {_known()}"
        ) from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TaskError(f"task {spec!r}: module {module_name!r} has no callable {func_name!r}")
    result = func()
    if not isinstance(result, (Task, TaskFamily)):
        raise TaskError(
            f"task {spec!r}: {module_name}.{func_name}() returned {type(result).__name__}, "
            "expected a l3rs Task or TaskFamily"
        )
    return result


def resolve(spec: str | Task | TaskFamily) -> Task | TaskFamily:
    """A registered name (-> its TaskFamily, or whatever was registered) or 'package.module:function'.

    Raises UnknownTaskError (a KeyError and ValueError) for unknown names and TaskError (a ValueError)
    for malformed or unimportable module specs; both messages name the spec and list the known tasks.
    """
    if isinstance(spec, (Task, TaskFamily)):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(
            f"a task must be a name or 'package.module:function', got {spec!r}; known tasks: {_known()}"
        )
    spec = spec.strip()
    if spec in _REGISTRY:
        return _REGISTRY[spec][0]()
    if ":" not in spec or spec.split(":", 1)[0] in _REGISTRY:
        _check_known(spec)
    if not _MODULE_SPEC.match(spec):
        raise TaskError(
            f"malformed task spec {spec!r}: expected a known task name or "
            f"'package.module:function'; known tasks: {_known()}"
        )
    return _load_spec(spec)


def get(spec: str | Task | TaskFamily) -> Task:
    """The Task for a name or module:function spec (a family's representative `base` task)."""
    result = resolve(spec)
    return result.base if isinstance(result, TaskFamily) else result


def family(spec: str | Task | TaskFamily) -> TaskFamily:
    """The TaskFamily for a spec; a bare Task becomes the family of its head seeds (TaskFamily.of)."""
    result = resolve(spec)
    return result if isinstance(result, TaskFamily) else TaskFamily.of(result)
