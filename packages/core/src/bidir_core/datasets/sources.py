"""What a data argument can name, and reading it: the one place that knows the built-in datasets by name and picks
the reader of a file by its suffix.

A data argument is the name of a built-in dataset ("stdlib-docstrings", mined by stdlib.py; "installed-docstrings",
mined by installed.py) or a path. A new
built-in dataset gets its module (like stdlib.py) and a branch here; a new file format gets its reader beside the
others (training.py, retrieval.py, texts.py) and an entry here. The readers never import this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from bidir_core.datasets.installed import (
    INSTALLED_DOCSTRINGS,
    installed_counts,
    installed_dev,
    installed_train,
)
from bidir_core.datasets.retrieval import RetrievalDataset, load_beir
from bidir_core.datasets.stdlib import STDLIB_DOCSTRINGS, stdlib_counts, stdlib_dev, stdlib_train
from bidir_core.datasets.texts import distinct_texts, jsonl_fields, text_lines
from bidir_core.datasets.training import TrainingExample, read_jsonl_examples, read_tsv_examples
from bidir_core.errors import BidirError

TRAINING_READERS = {
    ".jsonl": read_jsonl_examples,
    ".json": read_jsonl_examples,
    ".tsv": read_tsv_examples,
    ".txt": read_tsv_examples,
}
"""Training file suffix -> reader."""
BUILTIN = {
    STDLIB_DOCSTRINGS: (stdlib_train, stdlib_dev, stdlib_counts),
    INSTALLED_DOCSTRINGS: (installed_train, installed_dev, installed_counts),
}
"""A built-in dataset's name -> (its train examples, its dev split, its mining counts)."""
_NAMES = " or ".join(repr(name) for name in BUILTIN)


def read_training_examples(source: str | Path) -> Iterator[TrainingExample]:
    """Stream the examples of a .jsonl / .tsv file, or of the built-in dataset's train split by its name.

    A bad row stops the stream with a BidirError("path:line: what is wrong"); no row is skipped silently.
    """
    if str(source) in BUILTIN:
        yield from BUILTIN[str(source)][0]()
        return
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in TRAINING_READERS:
        raise BidirError(
            f"{path}: unknown training data format {suffix or '(no suffix)'!r}: expected .jsonl, .tsv or the "
            f"name {_NAMES}"
        )
    yield from TRAINING_READERS[suffix](path)


def load_retrieval(source: str | Path, split: str = "test") -> RetrievalDataset:
    """A BEIR folder's corpus, the queries judged in qrels/<split>.tsv and those judgments (retrieval.load_beir); or
    a built-in dataset's dev split by its name (split "dev", or the default "test", which names it too)."""
    if str(source) in BUILTIN:
        if split not in ("dev", "test"):
            raise BidirError(f"{source} has one evaluation split, 'dev', not {split!r}")
        return BUILTIN[str(source)][1]()
    folder = Path(source)
    if not folder.is_dir():
        raise BidirError(
            f"{folder}: not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), nor the "
            f"name {_NAMES}"
        )
    return load_beir(folder, split)


def read_texts(source: str | Path, fields: Sequence[str] = ()) -> list[str]:
    """The distinct non-blank texts of a source, in the order first seen: the passages of a built-in dataset's
    train split; the lines of a .txt file; the named fields of a .jsonl file; or, without fields, every query,
    positive and negative of a training file."""
    if str(source) in BUILTIN:
        if fields:
            raise BidirError(f"{source}: has no fields to choose ({', '.join(fields)} given)")
        texts = (p for ex in BUILTIN[str(source)][0]() for p in ex.positives)
    else:
        path = Path(source)
        if path.suffix.lower() == ".txt":
            texts = text_lines(path)
        elif fields:
            texts = jsonl_fields(path, fields)
        else:
            texts = (
                t for ex in read_training_examples(path) for t in (ex.query, *ex.positives, *ex.negatives)
            )
    return distinct_texts(texts, source)


def builtin_counts(source: str | Path) -> dict[str, int] | None:
    """How a built-in dataset was mined (stdlib.stdlib_counts, installed.installed_counts); None for a file or
    folder."""
    return BUILTIN[str(source)][2]() if str(source) in BUILTIN else None
