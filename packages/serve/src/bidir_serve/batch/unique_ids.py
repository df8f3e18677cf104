"""--check-unique-ids: read the whole input once before any work, validating every row and checking every id unique
across all shards, in memory and open files that do not grow with the corpus.

Hash partitioning on disk: each row's (index, id) is appended to one of FANOUT bucket files chosen by a hash of the
id, so equal ids land in the same bucket. A bucket of at most BUCKET_ROWS records is checked with a set of its ids; a
larger one is split again the same way (by another hash), recursively, so each level holds FANOUT files open and one
set of at most BUCKET_ROWS ids, and a corpus of N rows costs about log_FANOUT(N / BUCKET_ROWS) extra passes over its
ids on disk. The duplicate reported is the first in input order (the lowest row index that repeats an earlier id), as
a check with one global set would; the places named are found by reading those rows' shards again (only then).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from bidir_core.errors import BidirError
from bidir_serve.batch.plan import InputPlan, shard_rows

BUCKET_ROWS = 100_000
"""Records a bucket may hold to be checked in memory (a set of ~100,000 ids: about 10 MB)."""
FANOUT = 64
"""Buckets per split: the files open at once."""
MAX_DEPTH = 8


def check_unique_ids(plan: InputPlan, id_field: str, text_field: str, spill_dir: Path | None = None) -> None:
    """A BidirError naming the first repeated id and where it repeats, if any id occurs twice in the input."""

    def records() -> Iterator[tuple[int, str]]:
        index = 0
        for k in range(plan.n_shards):
            for row in shard_rows(
                plan, k, id_field, text_field
            ):  # validates each row; ids unique within a shard
                yield index, row.id
                index += 1

    with tempfile.TemporaryDirectory(prefix="bidir-unique-ids-", dir=spill_dir) as tmp:
        first, count = _check(records(), Path(tmp), depth=0, small=plan.rows <= BUCKET_ROWS)
    if first is not None:
        index, id_ = first
        earlier = next(i for i, other in records() if other == id_)  # a second read, only to name the place
        raise BidirError(
            f"{count} duplicate id(s) in the input, the first {id_!r} again at "
            f"{_where(plan, id_field, text_field, index)} (first at {_where(plan, id_field, text_field, earlier)}); "
            "every id must be unique"
        )


def _check(records: Iterable[tuple[int, str]], folder: Path, depth: int, small: bool):
    """(first repeat (index, id) or None, number of repeats) among records, in input order."""
    if small:
        seen: set[str] = set()
        first, count = None, 0
        for index, id_ in records:
            if id_ in seen:
                count += 1
                first = (index, id_) if first is None or index < first[0] else first
            seen.add(id_)
        return first, count
    paths = [folder / f"{depth}-{b:02d}.txt" for b in range(FANOUT)]
    sizes = [0] * FANOUT
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(p.open("w", encoding="utf-8")) for p in paths]
        for index, id_ in records:
            b = hash((depth, id_)) % FANOUT  # str hashes are salted per process; every pass runs in this one
            files[b].write(f"{index}\t{json.dumps(id_, ensure_ascii=False)}\n")
            sizes[b] += 1
    first, count = None, 0
    for path, size in zip(paths, sizes, strict=True):
        # Past MAX_DEPTH splits a bucket's ids all share 6 x MAX_DEPTH bits of hash: they are (nearly) one id
        # repeated, which a set holds in little memory whatever the count.
        sub_first, sub_count = _check(
            _read(path), folder, depth + 1, size <= BUCKET_ROWS or depth + 1 >= MAX_DEPTH
        )
        path.unlink()
        count += sub_count
        if sub_first is not None and (first is None or sub_first[0] < first[0]):
            first = sub_first
    return first, count


def _read(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            index, id_ = line.split("\t", 1)
            yield int(index), json.loads(id_)


def _where(plan: InputPlan, id_field: str, text_field: str, index: int) -> str:
    """file:line of row `index`, read from its shard."""
    k = index // plan.shard_size
    rows = shard_rows(plan, k, id_field, text_field)
    return next(row for i, row in enumerate(rows) if i == index - k * plan.shard_size).where
