"""The embedded default dataset: retrieval pairs mined from the docstrings of the Python standard library.

For every function, class and module docstring in the stdlib's own source files (parsed with `ast`, never imported,
so nothing runs and the result depends only on the interpreter's files):

    query   = the summary: the first sentence of the docstring's first paragraph
    passage = "qualified.name(signature)" on its first line, then the rest of the docstring (cut at a line or word
              end after at most MAX_BODY_CHARS characters, which keeps the task small enough for CPU-only training)

Trivial docstrings (a summary of fewer than 3 words, no body, a passage that repeats the summary) are skipped; a repeated query, body or qualified name
keeps only its first occurrence (modules in sorted order), so no query is ambiguous and no passage appears twice.
Whole modules go to train or dev by a SHA-256 of the dotted module name, stable across runs and machines.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
MAX_BODY_CHARS = 400
"""Passage bodies are cut after this many characters (at a line or word end)."""
MIN_QUERY_WORDS = 3
MIN_BODY_CHARS = 20

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter (or the end of the paragraph).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass(frozen=True)
class _Pair:
    module: str
    qualname: str
    query: str
    passage: str


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


@functools.cache
def _build() -> tuple[tuple[TrainingExample, ...], RetrievalDataset, dict[str, int]]:
    counts = dict.fromkeys(("files", "docstrings", "trivial", "duplicate", "train", "dev", "dev_modules"), 0)
    seen: set[str] = set()  # normalized queries, bodies and qualified names already used
    train: list[TrainingExample] = []
    corpus, queries, qrels = {}, {}, {}
    dev_modules = set()
    for module, path in _stdlib_files():
        counts["files"] += 1
        for qualname, signature, docstring, line in _docstrings(module, path):
            counts["docstrings"] += 1
            query, body = _split_docstring(docstring)
            passage = f"{signature}\n{body}"
            # Trivial: a short summary, no body, or a passage that repeats the summary (found by string match).
            if len(query.split()) < MIN_QUERY_WORDS or len(body) < MIN_BODY_CHARS or query in passage:
                counts["trivial"] += 1
                continue
            keys = {"q:" + " ".join(query.lower().split()), "b:" + " ".join(body.split()), "n:" + qualname}
            if keys & seen:
                counts["duplicate"] += 1
                continue
            seen |= keys
            if _is_dev(module):
                dev_modules.add(module)
                corpus[qualname] = passage
                queries["q:" + qualname] = query
                qrels["q:" + qualname] = {qualname: 1}
            else:
                train.append(
                    TrainingExample(query, (passage,), positive_ids=(qualname,), origin=f"{path}:{line}")
                )
    counts.update(train=len(train), dev=len(queries), dev_modules=len(dev_modules))
    if not train or not queries:
        raise BidirError(
            f"{STDLIB_DOCSTRINGS}: found no docstrings in the standard library at {_stdlib_root()}"
        )
    dev = RetrievalDataset(name=f"{STDLIB_DOCSTRINGS}:dev", corpus=corpus, queries=queries, qrels=qrels)
    return tuple(train), dev, counts


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


def _docstrings(module: str, path: Path) -> Iterator[tuple[str, str, str, int]]:
    """(qualified name, signature line, docstring, line number) of the module and of each function and class defined at module
    level or in a class body (not functions nested in functions), in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return  # a file this interpreter cannot parse (e.g. a template) is not library code
    doc = ast.get_docstring(tree)
    if doc:
        yield module, f"module {module}", doc, 1

    def walk(body: list[ast.stmt], prefix: str, in_class: bool):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc:
                    yield qualname, _signature(node, qualname, in_class), doc, node.lineno
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body, qualname, True)

    yield from walk(tree.body, module, False)


def _signature(node: ast.AST, qualname: str, in_class: bool) -> str:
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        return f"class {qualname}({_arguments(init.args, True) if init else ''})"
    return f"{qualname}({_arguments(node.args, in_class)})"


def _arguments(args: ast.arguments, is_method: bool) -> str:
    text = ast.unparse(args)
    return re.sub(r"^(self|cls)(, )?", "", text) if is_method else text


def _split_docstring(docstring: str) -> tuple[str, str]:
    """(summary sentence, the rest of the docstring cut to MAX_BODY_CHARS)."""
    text = inspect.cleandoc(docstring)
    first, _, others = text.partition("\n\n")
    sentences = _SENTENCE_END.split(" ".join(first.split()), maxsplit=1)
    query = sentences[0]
    body = "\n\n".join(part for part in (sentences[1] if len(sentences) > 1 else "", others.strip()) if part)
    return query, _cut(body.strip(), MAX_BODY_CHARS)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind("\n"), head.rfind(" "))
    return head[: end if end > limit // 2 else limit].rstrip()


def _is_dev(module: str) -> bool:
    digest = hashlib.sha256(module.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < DEV_PERCENT
