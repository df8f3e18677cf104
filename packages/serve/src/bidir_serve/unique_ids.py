"""--check-unique-ids: read the whole input once before any work, validating every row and checking every id unique
across all shards, in memory bounded by a bucket rather than by the corpus.

Each row's (index, id) goes to one of B bucket files on disk chosen by a hash of the id, so equal ids land in the
same bucket; then each bucket (about BUCKET_ROWS ids) is checked with a set of its ids. Records are buffered and
appended to their buckets in batches (a file is open only while its batch is written), so neither memory nor the
number of open files grows with the corpus. The duplicate reported is the first in input order (the lowest row index
that repeats an earlier id), as a check with one global set would; the two places it is named by are found by
reading the shard of each row again (only when there is a duplicate).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bidir_core.errors import BidirError
from bidir_serve.input_plan import InputPlan, shard_rows

BUCKET_ROWS = 250_000
"""Ids per bucket on average: the most ids the check keeps in memory at once (~25 MB of Python strings)."""
BUFFERED = 200_000
"""Records held before they are appended to their bucket files."""


def check_unique_ids(plan: InputPlan, id_field: str, text_field: str, spill_dir: Path | None = None) -> None:
    """A BidirError naming the first repeated id and where it repeats, if any id occurs twice in the input."""
    n_buckets = max(1, -(-plan.rows // BUCKET_ROWS))
    with tempfile.TemporaryDirectory(prefix="bidir-unique-ids-", dir=spill_dir) as tmp:
        paths = [Path(tmp) / f"bucket-{b:05d}.txt" for b in range(n_buckets)]
        _spill(plan, id_field, text_field, paths)
        first, count = None, 0
        for path in paths:
            seen: set[str] = set()
            with path.open(encoding="utf-8") as f:
                for line in f:
                    index, id_ = _parse(line)
                    if id_ in seen:
                        count += 1
                        first = (index, id_) if first is None or index < first[0] else first
                    seen.add(id_)
    if first is not None:
        index, id_ = first
        earlier = _first_index(plan, id_field, text_field, id_)
        raise BidirError(
            f"{count} duplicate id(s) in the input, the first {id_!r} again at "
            f"{_where(plan, id_field, text_field, index)} (first at {_where(plan, id_field, text_field, earlier)}); "
            "every id must be unique"
        )


def _spill(plan: InputPlan, id_field: str, text_field: str, paths: list[Path]) -> None:
    """Every row read (and validated); (index, id) appended to bucket hash(id) % len(paths)."""
    buffers: list[list[str]] = [[] for _ in paths]
    held, index = 0, 0
    for k in range(plan.n_shards):
        for row in shard_rows(
            plan, k, id_field, text_field
        ):  # validates each row, ids unique within the shard
            # Python's str hash is salted per process; both passes run in this one, so it is consistent here.
            buffers[hash(row.id) % len(paths)].append(f"{index}\t{json.dumps(row.id, ensure_ascii=False)}\n")
            index, held = index + 1, held + 1
            if held == BUFFERED:
                _flush(buffers, paths)
                held = 0
    _flush(buffers, paths)


def _flush(buffers: list[list[str]], paths: list[Path]) -> None:
    for buffer, path in zip(buffers, paths, strict=True):
        with path.open(
            "a", encoding="utf-8"
        ) as f:  # made empty if it has no record yet: pass 2 reads them all
            f.writelines(buffer)
        buffer.clear()


def _parse(line: str) -> tuple[int, str]:
    index, id_ = line.split("\t", 1)
    return int(index), json.loads(id_)


def _first_index(plan: InputPlan, id_field: str, text_field: str, id_: str) -> int:
    """The row index of id_'s first occurrence (a second read of the input, only when reporting a duplicate)."""
    index = 0
    for k in range(plan.n_shards):
        for row in shard_rows(plan, k, id_field, text_field):
            if row.id == id_:
                return index
            index += 1
    raise AssertionError("unreachable: the id was read in the first pass")


def _where(plan: InputPlan, id_field: str, text_field: str, index: int) -> str:
    """file:line of row `index`, read from its shard."""
    k = index // plan.shard_size
    for i, row in enumerate(shard_rows(plan, k, id_field, text_field)):
        if i == index - k * plan.shard_size:
            return row.where
    raise AssertionError("unreachable: the row was read in the first pass")
