"""Check the import contract between the bidir packages (stdlib only).

Rules (the root README: "Dependencies point one way"):

- ``bidir_core`` imports none of ``bidir_train``, ``bidir_export``, ``bidir_serve``;
- ``bidir_train``, ``bidir_export`` and ``bidir_serve`` may import ``bidir_core`` but never each other;
- no import circle among the project's source modules (``packages/*/src``). An
  import inside a function counts like one at the top of the file: a lazy import that closes a circle only hides it.
  An import names the module it reads (``from a.b import c`` reads ``a.b.c`` where that is a module, else
  ``a.b``), not the packages above it whose ``__init__`` Python also runs.

Files checked: ``packages/*/src/bidir_*/**/*.py`` and ``packages/*/tests/**/*.py``; the owning package is the
folder name under ``packages/``. Absolute ``import x`` / ``import x.y`` / ``from x import`` / ``from x.y import``
statements are checked wherever they appear (also inside functions), as are ``importlib.import_module("x")``
and ``__import__("x")`` calls with a literal name. Relative imports stay inside their own package and are fine.

Usage: ``python tools/check_imports.py [ROOT]``. Prints one ``path:line: bidir_a imports bidir_b`` line per
violation and one ``import circle: a.py:LINE -> b.py:LINE -> ... -> a.py`` line per circle (each ``file:LINE``
is the import of the next file; a circle of several loops visits each of its files) and exits 1, or prints
``import contract OK (N files)`` and exits 0.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

CORE = "bidir_core"
LEAVES = ("bidir_train", "bidir_export", "bidir_serve")


def forbidden_for(owner: str) -> set[str]:
    """Top-level modules that package ``owner`` must not import."""
    if owner == CORE or owner in LEAVES:
        return {m for m in LEAVES if m != owner}
    return set()


def iter_files(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(owning module, file)`` for every checked file under ``root``."""
    for pkg_dir in sorted((root / "packages").glob("*/")):
        owner = "bidir_" + pkg_dir.name
        files = [*pkg_dir.glob("src/bidir_*/**/*.py"), *pkg_dir.glob("tests/**/*.py")]
        for path in sorted(set(files)):
            yield owner, path


def import_statements(tree: ast.AST) -> Iterator[tuple[int, int, str, tuple[str, ...]]]:
    """Yield ``(line, level, module, names)`` for every import in ``tree``, wherever it is: ``import a.b`` is
    ``(line, 0, "a.b", ())``, ``from ..a import b, c`` is ``(line, 2, "a", ("b", "c"))``, and an
    ``importlib.import_module("a.b")`` / ``__import__("a.b")`` call with a literal name is like ``import a.b``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, 0, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.level, node.module or "", tuple(a.name for a in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and not arg.value.startswith(".")
            ):
                yield node.lineno, 0, arg.value, ()


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Yield ``(line, top-level module)`` for each absolute import in ``tree``."""
    for line, level, module, _ in import_statements(tree):
        if level == 0 and module:
            yield line, module.split(".")[0]


def check_file(path: Path, owner: str, display: str) -> list[str]:
    """Return the violations found in one file (a file that does not parse is one)."""
    forbidden = forbidden_for(owner)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        line = getattr(exc, "lineno", None) or 0
        return [f"{display}:{line}: cannot parse ({type(exc).__name__}); import contract not checked"]
    return [
        f"{display}:{line}: {owner} imports {module}"
        for line, module in sorted(set(imported_modules(tree)))
        if module in forbidden
    ]


def source_modules(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every source module under ``root/packages/*/src``."""
    modules = {}
    for src in sorted((root / "packages").glob("*/src")):
        for path in sorted(src.glob("bidir_*/**/*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported_source_modules(
    tree: ast.AST, name: str, is_package: bool, modules
) -> Iterator[tuple[int, str]]:
    """Yield ``(line, module)`` for each import in module ``name``'s tree of a module in ``modules``."""

    def longest(dotted: str) -> str | None:  # `import a.b.c` reads the deepest of a.b.c, a.b, a that is ours
        parts = dotted.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    package = name if is_package else name.rpartition(".")[0]
    for line, level, module, names in import_statements(tree):
        if level:  # relative: `from .. import x` in a.b.c (a module) starts from a
            base = ".".join(package.split(".")[: len(package.split(".")) - level + 1])
            module = ".".join(filter(None, (base, module)))
        for alias in names or ("",):  # `from a import b`: the module a.b where there is one, else a itself
            target = f"{module}.{alias}" if f"{module}.{alias}" in modules else longest(module)
            if target:
                yield line, target


def import_graph(root: Path) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """``({module: {imported module: line of its first import}}, modules)`` over the project's source."""
    modules = source_modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # reported by check_file
        for line, target in _imported_source_modules(tree, name, path.name == "__init__.py", modules):
            if target != name:
                edges[target] = min(line, edges.get(target, line))
    return graph, modules


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (each one circle or several)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _path_within(graph, members: set[str], start: str, goals: set[str]) -> list[str]:
    """The shortest import path start -> ... -> one of goals that stays inside members (breadth first)."""
    previous = {start: None}
    queue = [start]
    for node in queue:
        for nxt in sorted(graph[node]):
            if nxt in members and nxt not in previous:
                previous[nxt] = node
                if nxt in goals:
                    path = [nxt]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return path[::-1]
                queue.append(nxt)
    raise AssertionError(f"{goals} not reachable from {start}: not one component")


def find_circles(root: Path) -> list[str]:
    """One ``import circle: a.py:LINE -> b.py:LINE -> ... -> a.py`` line per circle (strongly connected set of
    modules) under ``root``: a closed walk of imports from its first module through every module in it."""
    root = root.resolve()
    graph, modules = import_graph(root)
    lines = []
    for component in _strongly_connected(graph):
        members = set(component)
        walk, left = [component[0]], members - {component[0]}
        while left:
            walk += _path_within(graph, members, walk[-1], left)[1:]
            left -= set(walk)
        walk += _path_within(graph, members, walk[-1], {component[0]})[1:]
        steps = [
            f"{modules[a].relative_to(root).as_posix()}:{graph[a][b]}"
            for a, b in zip(walk, walk[1:], strict=False)
        ]
        lines.append("import circle: " + " -> ".join([*steps, modules[walk[0]].relative_to(root).as_posix()]))
    return lines


def find_violations(root: Path) -> list[str]:
    """Return one line per violation under ``root``: ``path:line: bidir_a imports bidir_b`` or ``import circle:
    ...``."""
    violations, _ = _scan(root)
    return violations


def _scan(root: Path) -> tuple[list[str], int]:
    root = root.resolve()
    violations: list[str] = []
    count = 0
    for owner, path in iter_files(root):
        count += 1
        violations += check_file(path, owner, path.relative_to(root).as_posix())
    return violations + find_circles(root), count


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent
    violations, count = _scan(root)
    for line in violations:
        print(line)
    if violations:
        return 1
    print(f"import contract OK ({count} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
