"""Mining retrieval pairs from Python docstrings, shared by the two built-in datasets (stdlib.py: the standard
library; installed.py: every installed package). Source files are parsed with `ast`, never imported, so nothing
runs and the result depends only on the files.

For every function, class and module docstring:

    query   = the summary: the first sentence of the docstring's first paragraph
    passage = "qualified.name(signature)" on its first line, then the rest of the docstring (cut at a line or word
              end after at most MAX_BODY_CHARS characters, which keeps the task small enough for CPU-only training)

Trivial docstrings (a summary of fewer than 3 words, no body, a passage that repeats the summary) are skipped; a
repeated query, body or qualified name keeps only its first occurrence (files in the order given), so no query is
ambiguous and no passage appears twice. Whole modules go to train or dev by the caller's `is_dev(module)`.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bidir_core.datasets.retrieval import RetrievalDataset
from bidir_core.datasets.training import TrainingExample

MAX_BODY_CHARS = 400
"""Passage bodies are cut after this many characters (at a line or word end)."""
MIN_QUERY_WORDS = 3
MIN_BODY_CHARS = 20

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter (or the end of the paragraph).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass
class Mined:
    """What mine() found: the train examples, the dev split, the counts, and the dedup keys it used."""

    train: list[TrainingExample]
    dev: RetrievalDataset
    counts: dict[str, int]
    keys: set[str] = field(default_factory=set)  # normalized queries ("q:"), bodies ("b:"), names ("n:")


def mine(
    name: str,
    files: Iterable[tuple[str, Path]],
    is_dev: Callable[[str], bool],
    exclude: frozenset[str] = frozenset(),
) -> Mined:
    """Pairs of the docstrings of `files` ((dotted module, path), in order), split by is_dev(module). A docstring
    whose query, body or qualified name is in `exclude` (keys as in Mined.keys) is skipped and counted as
    "excluded": that keeps another dataset's texts out of this one."""
    counts = dict.fromkeys(("files", "docstrings", "trivial", "duplicate", "train", "dev", "dev_modules"), 0)
    if exclude:
        counts["excluded"] = 0
    seen: set[str] = set()  # normalized queries, bodies and qualified names already used
    train: list[TrainingExample] = []
    corpus, queries, qrels = {}, {}, {}
    dev_modules = set()
    for module, path in files:
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
            if keys & exclude:
                counts["excluded"] += 1
                continue
            if keys & seen:
                counts["duplicate"] += 1
                continue
            seen |= keys
            if is_dev(module):
                dev_modules.add(module)
                corpus[qualname] = passage
                queries["q:" + qualname] = query
                qrels["q:" + qualname] = {qualname: 1}
            else:
                train.append(
                    TrainingExample(query, (passage,), positive_ids=(qualname,), origin=f"{path}:{line}")
                )
    counts.update(train=len(train), dev=len(queries), dev_modules=len(dev_modules))
    dev = RetrievalDataset(name=f"{name}:dev", corpus=corpus, queries=queries, qrels=qrels)
    return Mined(train, dev, counts, seen)


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
