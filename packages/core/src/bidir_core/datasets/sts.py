"""STS-style similarity data: TSV rows `score, sentence1, sentence2[, extra columns...]`, unquoted."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from bidir_core.datasets.lines import read_lines
from bidir_core.errors import BidirError


@dataclass(frozen=True)
class StsPair:
    """Two sentences and their human similarity score (STS-B: 0.0 unrelated .. 5.0 equivalent)."""

    sentence1: str
    """The first sentence."""
    sentence2: str
    """The second sentence."""
    score: float
    """The gold similarity score."""


# A column name: one word (score, sentence1, text_a, Similarity). A header is a first line whose score, sentence1
# and sentence2 cells all are one: a score that is not a number (4,5) or a row of sentences stays an error.
_COLUMN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def read_sts(path: str | Path) -> list[StsPair]:
    """Every pair of an STS TSV file. A first line of column names (`score<TAB>sentence1<TAB>sentence2`, each one
    word) is a header (skipped); any other row with a missing column, an empty sentence or a non-numeric score is a
    BidirError naming its line and value.
    """
    path = Path(path)
    pairs: list[StsPair] = []
    for number, text in read_lines(path):
        where = f"{path}:{number}"
        if not text.strip():
            continue
        cells = text.split("\t")
        if len(cells) < 3:
            raise BidirError(
                f"{where}: expected score<TAB>sentence1<TAB>sentence2, got {len(cells)} column(s)"
            )
        try:
            score = float(cells[0])
        except ValueError:
            if number == 1 and all(_COLUMN_NAME.fullmatch(c) for c in cells[:3]):
                continue
            raise BidirError(f"{where}: score {cells[0]!r} is not a number") from None
        if not math.isfinite(score):
            raise BidirError(f"{where}: score {cells[0]!r} is not a finite number")
        for i in (1, 2):
            if not cells[i].strip():
                raise BidirError(f"{where}: sentence{i} is empty")
        pairs.append(StsPair(cells[1], cells[2], score))
    if not pairs:
        raise BidirError(f"{path}: no sentence pairs")
    return pairs
