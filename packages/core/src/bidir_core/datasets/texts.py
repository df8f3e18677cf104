"""Raw text for unsupervised objectives (MNTP): every distinct text of a dataset, in first-seen order.

Sources:
- "stdlib-docstrings": the passages of the embedded dataset's train split;
- a .txt file: one text per non-blank line;
- a .jsonl file with `fields`: the named fields of every row (each a string or a list of strings);
- a training file (.jsonl / .tsv) without `fields`: every query, positive and negative of its rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from bidir_core.datasets.lines import read_jsonl, read_lines
from bidir_core.datasets.training import STDLIB_DOCSTRINGS, read_training_examples
from bidir_core.errors import BidirError


def read_texts(source: str | Path, fields: Sequence[str] = ()) -> list[str]:
    """The distinct non-blank texts of `source` (see the module docstring), in the order first seen."""
    if str(source) == STDLIB_DOCSTRINGS:
        if fields:
            raise BidirError(f"{STDLIB_DOCSTRINGS}: has no fields to choose ({', '.join(fields)} given)")
        from bidir_core.datasets.stdlib import stdlib_docstrings

        texts = (p for ex in stdlib_docstrings("train") for p in ex.positives)
    else:
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            texts = (text for _, text in read_lines(path))
        elif fields:
            if suffix not in (".jsonl", ".json"):
                raise BidirError(
                    f"{path}: text fields ({', '.join(fields)}) are read from a .jsonl file only"
                )
            texts = _jsonl_fields(path, fields)
        else:
            texts = (
                t for ex in read_training_examples(path) for t in (ex.query, *ex.positives, *ex.negatives)
            )
    out = list(dict.fromkeys(_non_blank(texts)))
    if not out:
        raise BidirError(f"{source}: no text")
    return out


def _jsonl_fields(path: Path, fields: Sequence[str]) -> Iterable[str]:
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        for key in fields:
            if key not in row:
                raise BidirError(f"{where}: missing field {key!r}")
            value = row[key]
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in values):
                raise BidirError(f"{where}: field {key!r} must be a string or a list of strings")
            yield from values


def _non_blank(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        if text.strip():
            yield text
