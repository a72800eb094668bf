"""The package's import structure, read with `ast` (no module is imported): no import cycle among
semdedup_assets modules, and no private name (leading underscore) used across modules.

What counts as an import for the cycle check: every `import` / `from ... import` a module's code can
execute, at module level *and inside functions*; a function-local import is deferred (to keep torch,
Ray or Dagster off an import path), but it is still a dependency of the module, and a cycle hidden
behind one is still a cycle (core/engines.py <-> core/ingest.py was one). Imports under
`if TYPE_CHECKING:` do not count: they never run and only name types for annotations.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "semdedup_assets"
ROOT = PACKAGE.parent


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module under semdedup_assets/."""
    out: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and any(
        (isinstance(n, ast.Name) and n.id == "TYPE_CHECKING")
        or (isinstance(n, ast.Attribute) and n.attr == "TYPE_CHECKING")
        for n in ast.walk(node.test)
    )


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, function-local ones included, except under TYPE_CHECKING."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        if _is_type_checking(child):
            yield from (n for branch in child.orelse for n in runtime_imports(ast.Module([branch], [])))
            continue
        yield from runtime_imports(child)


def resolve(
    module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]
) -> list[tuple[str, str | None]]:
    """(target module, imported name or None) for each name an import statement binds."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, a.name) for a in node.names]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the semdedup_assets modules it imports (see the module docstring for what counts)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target, _ in resolve(module, path, node, modules):
                if target in modules and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """`from semdedup_assets.x import _name`, and `alias._name` where alias is a semdedup_assets module
    imported by another module (`from semdedup_assets.core.io import storage as st; st._x`)."""
    problems: list[str] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        aliases: dict[str, str] = {}  # local name -> the semdedup_assets module it is bound to
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for (target, name), alias in zip(resolve(module, path, node, modules), node.names):
                if not target.startswith("semdedup_assets") or target == module:
                    continue
                if name is not None and _private(name):
                    problems.append(f"{path.relative_to(root)}:{node.lineno}: imports {name} from {target}")
                if isinstance(node, ast.Import):
                    if alias.asname:
                        aliases[alias.asname] = target
                    else:
                        aliases[target.split(".")[0]] = target.split(".")[0]
                elif target in modules and (name is None or target.endswith(f".{name}")):
                    aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = _dotted(node.value, aliases)
                if owner is not None and owner in modules and owner != module:
                    problems.append(f"{path.relative_to(root)}:{node.lineno}: uses {owner}.{node.attr}")
    return problems


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The module an expression names (`st`, `semdedup_assets.core.io.storage`), or None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def test_no_import_cycle() -> None:
    modules = module_files()
    assert len(modules) > 50  # the walk found the package
    found = cycles(import_graph(modules))
    assert found == [], "import cycles among semdedup_assets modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_name_across_modules() -> None:
    problems = private_uses(module_files())
    assert problems == [], "private names used across modules:\n" + "\n".join(problems)


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The checks themselves, on a tiny package: a cycle through a function-local import, one under
    TYPE_CHECKING (ignored), a private import and a private attribute of an imported module."""
    pkg = tmp_path / "semdedup_assets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from semdedup_assets import b\n\ndef f():\n    from semdedup_assets.c import _x\n")
    (pkg / "b.py").write_text("def g():\n    from semdedup_assets import a\n    return a._hidden\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from semdedup_assets import a\n_x = 1\n"
    )
    modules = {}
    for path in sorted(pkg.glob("*.py")):
        modules["semdedup_assets" if path.stem == "__init__" else f"semdedup_assets.{path.stem}"] = path
    assert cycles(import_graph(modules)) == [["semdedup_assets.a", "semdedup_assets.b"]]
    problems = private_uses(modules, tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "imports _x from semdedup_assets.c",
        "uses semdedup_assets.a._hidden",
    ]
