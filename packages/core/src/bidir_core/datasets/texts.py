"""Raw text for unsupervised objectives (MNTP): the pieces sources.read_texts puts together.

- a .txt file: one text per non-blank line (text_lines);
- a .jsonl file with `fields`: the named fields of every row, each a string or a list of strings (jsonl_fields);
- a training file or the built-in dataset: its texts, chosen by sources.read_texts;
then every distinct non-blank text, in first-seen order (distinct_texts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from bidir_core.datasets.lines import read_jsonl, read_lines
from bidir_core.errors import BidirError


def text_lines(path: Path) -> Iterable[str]:
    """Every line of a text file."""
    return (text for _, text in read_lines(path))


def jsonl_fields(path: Path, fields: Sequence[str]) -> Iterable[str]:
    """The named fields of every row of a .jsonl file (each a string or a list of strings)."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise BidirError(f"{path}: text fields ({', '.join(fields)}) are read from a .jsonl file only")
    return _jsonl_fields(path, fields)


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


def distinct_texts(texts: Iterable[str], source: str | Path) -> list[str]:
    """The distinct non-blank texts, in the order first seen; at least one (else a BidirError naming source)."""
    out = list(dict.fromkeys(text for text in texts if text.strip()))
    if not out:
        raise BidirError(f"{source}: no text")
    return out
