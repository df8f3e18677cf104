"""Training data: JSONL rows or TSV pairs/triplets, streamed and validated row by row.
(sources.read_training_examples picks the reader by suffix, or the built-in dataset by name.)

JSONL, one object per line (NeMo AutoModel's inline format)::

    {
        "query": "...",
        "pos_doc": "..." | ["...", ...],
        "neg_doc": ["...", ...],
        "pos_id": ...,
        "neg_ids": [...],
        "pos_score": 7.1 | [7.1, ...],
        "neg_scores": [2.3, ...],
    }

`question` is accepted for `query`; `neg_doc` is optional; ids (`pos_id` / `pos_ids`, `neg_id` / `neg_ids`: a str,
an int or a list of them, one per document) are optional and let the loss recognise the same document in two rows.
Teacher scores (`pos_score`: a number or a list, one per positive; `neg_scores`: one per negative, e.g. a reranker's
logits, as `bidir-mine --rescore` writes them) are optional and are what a distillation loss learns from; a row
that gives one gives both (a row without negatives: `pos_score` alone), every value finite.

TSV, tab-separated and unquoted: `anchor, positive[, negative...]`. A first line whose first two cells are column
names (`anchor`/`query`/`question`, then `positive`/`pos_doc`) is a header; with a header, only the columns named
`negative*` / `neg*` become negatives and any other column (e.g. `source_split`) is ignored, with one warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bidir_core.datasets.lines import read_jsonl, read_lines, text_field
from bidir_core.errors import BidirError

_JSONL_KEYS = {"query", "question", "pos_doc", "neg_doc", "pos_id", "pos_ids", "neg_id", "neg_ids"}
_SCORE_KEYS = {"pos_score", "neg_scores"}
_ANCHOR_NAMES = {"anchor", "query", "question"}
_POSITIVE_NAMES = {"positive", "pos", "pos_doc"}


@dataclass(frozen=True)
class TrainingExample:
    """One training row: a query, its positive passages and optional hard negatives."""

    query: str
    """The query (anchor) text."""
    positives: tuple[str, ...]
    """At least one non-empty positive passage."""
    negatives: tuple[str, ...] = ()
    """Hard negatives (possibly none); a trainer samples from them."""
    positive_ids: tuple[str, ...] = ()
    """Empty, or one document id per positive (JSONL pos_id / pos_ids)."""
    negative_ids: tuple[str, ...] = ()
    """Empty, or one document id per negative (JSONL neg_id / neg_ids)."""
    positive_scores: tuple[float, ...] = ()
    """Empty, or one teacher score per positive (JSONL pos_score)."""
    negative_scores: tuple[float, ...] = ()
    """Empty, or one teacher score per negative (JSONL neg_scores); given with positive_scores."""
    origin: str = ""
    """Where the row came from ("path:line"), for error messages."""


def read_jsonl_examples(path: Path) -> Iterator[TrainingExample]:
    """The examples of a JSONL file; a bad row stops the stream with a BidirError("path:line: what is wrong")."""
    unknown_keys: set[str] = set()
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        if "query" in row and "question" in row:
            raise BidirError(f"{where}: has both 'query' and 'question'; give one")
        query = text_field(row, "question" if "question" in row else "query", where)
        positives = _texts(row, "pos_doc", where, required=True)
        negatives = _texts(row, "neg_doc", where, required=False)
        yield TrainingExample(
            query=query,
            positives=positives,
            negatives=negatives,
            positive_ids=_ids(row, ("pos_id", "pos_ids"), len(positives), "pos_doc", where),
            negative_ids=_ids(row, ("neg_id", "neg_ids"), len(negatives), "neg_doc", where),
            **_teacher_scores(row, len(positives), len(negatives), where),
            origin=where,
        )
        new = set(row) - _JSONL_KEYS - _SCORE_KEYS - unknown_keys
        if new:
            unknown_keys |= new
            warnings.warn(f"{where}: ignoring unknown field(s) {', '.join(sorted(new))}", stacklevel=3)


def _texts(row: dict, key: str, where: str, *, required: bool) -> tuple[str, ...]:
    """A str or a list of str; every one non-empty. A required field needs at least one."""
    if key not in row:
        if required:
            raise BidirError(f"{where}: missing field {key!r}")
        return ()
    value = row[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BidirError(
            f"{where}: field {key!r} must be a string or a list of strings, got {type(value).__name__}"
        )
    if required and not items:
        raise BidirError(f"{where}: field {key!r} is an empty list")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BidirError(f"{where}: {key}[{i}] must be a string, got {type(item).__name__}")
        if not item.strip():
            raise BidirError(f"{where}: {key}[{i}] is empty")
    return tuple(items)


def _ids(row: dict, keys: tuple[str, str], count: int, docs_key: str, where: str) -> tuple[str, ...]:
    """Optional document ids (the singular or the plural key), one per document of docs_key."""
    present = [k for k in keys if k in row]
    if not present:
        return ()
    if len(present) == 2:
        raise BidirError(f"{where}: has both {keys[0]!r} and {keys[1]!r}; give one")
    key = present[0]
    value = row[key]
    items = value if isinstance(value, list) else [value]
    ids = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)) or not str(item).strip():
            raise BidirError(
                f"{where}: field {key!r} must hold non-empty string or integer ids, got {item!r}"
            )
        ids.append(str(item))
    if len(ids) != count:
        raise BidirError(f"{where}: field {key!r} has {len(ids)} ids for {count} {docs_key} documents")
    return tuple(ids)


def _teacher_scores(row: dict, positives: int, negatives: int, where: str) -> dict:
    """The optional teacher scores: none, or pos_score (one per positive) and neg_scores (one per negative; not
    needed when the row has no negatives), every one a finite number."""
    if not _SCORE_KEYS & set(row):
        return {}
    if "pos_score" not in row:
        raise BidirError(f"{where}: has 'neg_scores' but no 'pos_score'; give both teacher scores or neither")
    if "neg_scores" not in row and negatives:
        raise BidirError(
            f"{where}: has 'pos_score' but no 'neg_scores' for its {negatives} neg_doc documents"
        )
    return {
        "positive_scores": _scores(row, "pos_score", positives, "pos_doc", where),
        "negative_scores": _scores(row, "neg_scores", negatives, "neg_doc", where)
        if "neg_scores" in row
        else (),
    }


def _scores(row: dict, key: str, count: int, docs_key: str, where: str) -> tuple[float, ...]:
    """A number or a list of numbers, one per document of docs_key, each finite (JSON allows NaN and Infinity)."""
    value = row[key]
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise BidirError(f"{where}: {key}[{i}] must be a number, got {item!r}")
        if not math.isfinite(item):
            raise BidirError(f"{where}: {key}[{i}] is {item}; teacher scores must be finite")
    if len(items) != count:
        raise BidirError(f"{where}: field {key!r} has {len(items)} scores for {count} {docs_key} documents")
    return tuple(float(x) for x in items)


def read_tsv_examples(path: Path) -> Iterator[TrainingExample]:
    """The examples of a TSV file (an optional header names the columns); a bad row is a BidirError as above."""
    negative_columns: list[int] | None = None  # with a header: which columns are negatives
    width = 0
    for number, text in read_lines(path):
        where = f"{path}:{number}"
        if not text.strip():
            continue
        cells = text.split("\t")
        if number == 1 and _is_header(cells):
            names = [c.strip().lower() for c in cells]
            negative_columns = [i for i, n in enumerate(names) if i >= 2 and n.startswith("neg")]
            ignored = [cells[i] for i in range(2, len(cells)) if i not in negative_columns]
            if ignored:
                warnings.warn(f"{path}: ignoring column(s) {', '.join(ignored)}", stacklevel=3)
            width = len(cells)
            continue
        if negative_columns is not None and len(cells) != width:
            raise BidirError(
                f"{where}: expected {width} tab-separated columns (as the header), got {len(cells)}"
            )
        if len(cells) < 2:
            raise BidirError(
                f"{where}: expected anchor<TAB>positive[<TAB>negative...], got {len(cells)} column"
            )
        columns = range(2, len(cells)) if negative_columns is None else negative_columns
        for i in [0, 1, *columns]:
            if not cells[i].strip():
                kind = ("anchor", "positive")[i] if i < 2 else "negative"
                raise BidirError(f"{where}: empty {kind} (column {i + 1})")
        yield TrainingExample(
            query=cells[0],
            positives=(cells[1],),
            negatives=tuple(cells[i] for i in columns),
            origin=where,
        )


def _is_header(cells: list[str]) -> bool:
    names = [c.strip().lower() for c in cells]
    return len(names) >= 2 and names[0] in _ANCHOR_NAMES and names[1] in _POSITIVE_NAMES
