"""A built-in dataset that needs no download either: retrieval pairs mined from the docstrings of every package
installed beside bidir (torch, transformers, numpy, ... are there wherever bidir runs), the way stdlib.py mines
the standard library's (docstrings.py: parsed, never imported; trivial and repeated docstrings skipped).

Files: every public module under the interpreter's site-packages folders (purelib, platlib), in sorted order; a
dotted part that is private (a leading underscore: vendored copies, C-extension shims), a test package, or not an
identifier (dist-info folders) leaves the file out. Split: whole modules go to dev by a SHA-256 of the dotted
module name (DEV_PERCENT of them), so dev never shares a module with train. A docstring whose query, body or
qualified name is also one of the standard library's (typing_extensions, backports, vendored stdlib code) is left
out, so training on this dataset never shows a stdlib-docstrings dev pair, and that dev split stays as it is.

The result depends on what is installed (and its versions): deterministic for one environment, counted by
installed_counts().
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

from bidir_core.datasets.docstrings import mine
from bidir_core.datasets.retrieval import RetrievalDataset
from bidir_core.datasets.stdlib import stdlib_keys
from bidir_core.datasets.training import TrainingExample
from bidir_core.errors import BidirError

INSTALLED_DOCSTRINGS = "installed-docstrings"
"""The dataset's name, accepted wherever a data path is (datasets/sources.py resolves it)."""
SKIPPED_PARTS = frozenset({"test", "tests", "testing_utils", "conftest", "setup", "benchmarks", "examples"})
"""Module name parts that are tests or scripts, not library code."""
DEV_PERCENT = 5
"""Share of modules (by hash) that form the dev split."""


def installed_train(roots: tuple[Path, ...] | None = None) -> list[TrainingExample]:
    """The train split (positive_ids are qualified names); roots: the folders to mine (default: site-packages)."""
    return list(_build(_roots(roots))[0])


def installed_dev(roots: tuple[Path, ...] | None = None) -> RetrievalDataset:
    """The dev split: the dev modules' passages, each query with exactly one relevant document."""
    return _build(_roots(roots))[1]


def installed_counts(roots: tuple[Path, ...] | None = None) -> dict[str, int]:
    """How the dataset was mined: files, docstrings, skipped (trivial / duplicate / stdlib's), pairs per split."""
    return dict(_build(_roots(roots))[2])


def module_files(roots: tuple[Path, ...]) -> list[tuple[str, Path]]:
    """(dotted module name, source file) of every public module under the roots, sorted by name (a module found
    under two roots keeps the first root's file)."""
    files: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if len(parts) > 1 and not (root / parts[0] / "__init__.py").is_file():
                continue  # not inside a regular package (a dist-info folder, a namespace of scripts)
            parts = parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts
            if any(not p.isidentifier() or p.startswith("_") or p in SKIPPED_PARTS for p in parts):
                continue
            files.setdefault(".".join(parts), path)
    return sorted(files.items())


def _roots(roots: tuple[Path, ...] | None) -> tuple[Path, ...]:
    if roots is not None:
        return tuple(Path(r) for r in roots)
    paths = sysconfig.get_paths()
    return tuple(Path(p) for p in dict.fromkeys((paths["purelib"], paths["platlib"])) if Path(p).is_dir())


@functools.cache
def _build(roots: tuple[Path, ...]) -> tuple[tuple[TrainingExample, ...], RetrievalDataset, dict[str, int]]:
    mined = mine(INSTALLED_DOCSTRINGS, module_files(roots), _is_dev, exclude=stdlib_keys())
    if not mined.train or not mined.dev.queries:
        raise BidirError(
            f"{INSTALLED_DOCSTRINGS}: too few docstrings under {', '.join(map(str, roots))} to make a train and a "
            f"dev split ({mined.counts['train']} train, {mined.counts['dev']} dev pairs)"
        )
    return tuple(mined.train), mined.dev, mined.counts


def _is_dev(module: str) -> bool:
    digest = hashlib.sha256(module.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < DEV_PERCENT
