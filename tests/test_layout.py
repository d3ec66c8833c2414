"""Layout rules of issue #9 that a refactor could silently break: no import cycle inside l3rs (module-level or
inside functions), no module over 400 lines, no private torch helpers besides the _foreach ops."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import l3rs

PACKAGE = Path(l3rs.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The l3rs modules `path` imports anywhere (top level or inside functions), resolved to modules."""
    name, found = _module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # "from . import x" is relative to the package, each extra dot one level up
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_inside_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    # a package's __init__ re-exporting its submodules is not a cycle: drop edges from a module to a parent
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_modules_are_short_and_use_no_private_torch_helpers():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{path.name} has over 400 lines"
        private = set(re.findall(r"torch(?:\.\w+)*\._[a-z]\w*", text)) - set(re.findall(r"torch\._foreach_\w+", text))
        assert not private, f"{path.name} uses private torch helpers {sorted(private)}"
