"""Check the import contract between the bidir packages (stdlib only).

Rules (DESIGN.md, "Dependencies point one way"):

- ``bidir_core`` imports none of ``bidir_train``, ``bidir_export``, ``bidir_serve``;
- ``bidir_train``, ``bidir_export`` and ``bidir_serve`` may import ``bidir_core`` but never each other.

Files checked: ``packages/*/src/bidir_*/**/*.py`` and ``packages/*/tests/**/*.py``; the owning package is the
folder name under ``packages/``. Absolute ``import x`` / ``import x.y`` / ``from x import`` / ``from x.y import``
statements are checked wherever they appear (also inside functions), as are ``importlib.import_module("x")``
and ``__import__("x")`` calls with a literal name. Relative imports stay inside their own package and are fine.

Usage: ``python tools/check_imports.py [ROOT]``. Prints one ``path:line: bidir_a imports bidir_b`` line per
violation and exits 1, or prints ``import contract OK (N files)`` and exits 0.
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


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Yield ``(line, top-level module)`` for each absolute import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module.split(".")[0]
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
                yield node.lineno, arg.value.split(".")[0]


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


def find_violations(root: Path) -> list[str]:
    """Return one ``path:line: bidir_a imports bidir_b`` string per violation under ``root``."""
    violations, _ = _scan(root)
    return violations


def _scan(root: Path) -> tuple[list[str], int]:
    root = root.resolve()
    violations: list[str] = []
    count = 0
    for owner, path in iter_files(root):
        count += 1
        violations += check_file(path, owner, path.relative_to(root).as_posix())
    return violations, count


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
