"""The embedded default dataset: retrieval pairs mined from the docstrings of the Python standard library.

For every function, class and module docstring in the stdlib's own source files (parsed with `ast`, never imported,
so nothing runs and the result depends only on the interpreter's files), the summary sentence is the query and the
signature plus the rest of the docstring the passage; trivial and repeated docstrings are skipped (docstrings.py
says how; modules in sorted order). Whole modules go to train or dev by a SHA-256 of the dotted module name, stable
across runs and machines.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import sysconfig
from pathlib import Path

from bidir_core.datasets.docstrings import mine
from bidir_core.datasets.retrieval import RetrievalDataset
from bidir_core.datasets.training import TrainingExample
from bidir_core.errors import BidirError

STDLIB_DOCSTRINGS = "stdlib-docstrings"
"""The dataset's name, accepted wherever a data path is (datasets/sources.py resolves it)."""

# Packages that are tests, GUIs, demos or bundled wheels rather than library code; private modules (a leading
# underscore in any dotted part) are skipped too.
SKIPPED_PACKAGES = frozenset(
    {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data"}
)
DEV_PERCENT = 12
"""Share of modules (by hash) that form the dev split."""


def stdlib_train() -> list[TrainingExample]:
    """The train split: one TrainingExample per pair (positive_ids are qualified names)."""
    return list(_build()[0])


def stdlib_dev() -> RetrievalDataset:
    """The dev split: a RetrievalDataset whose corpus is the dev passages, each query having exactly one relevant
    document."""
    return _build()[1]


def stdlib_counts() -> dict[str, int]:
    """How the dataset was mined: files parsed, docstrings seen, skipped (trivial / duplicate), pairs per split."""
    return dict(_build()[2])


def stdlib_keys() -> frozenset[str]:
    """The normalized queries, bodies and qualified names of both splits (docstrings.Mined.keys), so another
    dataset can keep the stdlib's texts, and so its dev split, out of its training rows."""
    return _build()[3]


@functools.cache
def _build() -> tuple[tuple[TrainingExample, ...], RetrievalDataset, dict[str, int], frozenset[str]]:
    mined = mine(STDLIB_DOCSTRINGS, _stdlib_files(), _is_dev)
    if not mined.train or not mined.dev.queries:
        raise BidirError(
            f"{STDLIB_DOCSTRINGS}: found no docstrings in the standard library at {_stdlib_root()}"
        )
    return tuple(mined.train), mined.dev, mined.counts, frozenset(mined.keys)


def _stdlib_root() -> Path:
    """The folder of the running interpreter's pure-Python standard library (the base one, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[str, Path]]:
    """(dotted module name, source file) of every public stdlib module, sorted by name."""
    root = _stdlib_root()
    files = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIPPED_PACKAGES or name in ("this", "antigravity"):
            continue
        if (root / f"{name}.py").is_file():
            files.append((name, root / f"{name}.py"))
        elif (root / name / "__init__.py").is_file():
            for path in sorted((root / name).rglob("*.py")):
                parts = path.relative_to(root).with_suffix("").parts
                parts = parts[:-1] if parts[-1] == "__init__" else parts
                if not any(p.startswith("_") or p in SKIPPED_PACKAGES for p in parts):
                    files.append((".".join(parts), path))
    return sorted(files)


def _is_dev(module: str) -> bool:
    digest = hashlib.sha256(module.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < DEV_PERCENT
