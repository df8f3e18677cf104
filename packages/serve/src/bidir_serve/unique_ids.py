"""--check-unique-ids: read the whole input once before any work, validating every row and checking every id unique
across all shards, in memory bounded by a bucket rather than by the corpus.

Each row's (index, id, where) is appended to one of B bucket files on disk chosen by a hash of the id, so equal ids
land in the same bucket; then each bucket (about BUCKET_ROWS ids) is checked with a set. The duplicate reported is
the first in input order (the lowest row index that repeats an earlier id), as a check with one global set would.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from bidir_core.errors import BidirError
from bidir_serve.input_plan import InputPlan, shard_rows

BUCKET_ROWS = 1_000_000
"""Ids per bucket on average: the most the check keeps in memory at once (~100 MB of Python strings)."""


def check_unique_ids(plan: InputPlan, id_field: str, text_field: str, spill_dir: Path | None = None) -> None:
    """A BidirError naming the first repeated id and where it repeats, if any id occurs twice in the input."""
    n_buckets = max(1, -(-plan.rows // BUCKET_ROWS))
    with tempfile.TemporaryDirectory(prefix="bidir-unique-ids-", dir=spill_dir) as tmp:
        paths = [Path(tmp) / f"bucket-{b:05d}.jsonl" for b in range(n_buckets)]
        files = [p.open("w", encoding="utf-8") for p in paths]
        try:
            index = 0
            for k in range(plan.n_shards):
                for row in shard_rows(
                    plan, k, id_field, text_field
                ):  # validates each row, and within the shard
                    files[_bucket(row.id, n_buckets)].write(json.dumps([index, row.id, row.where]) + "\n")
                    index += 1
        finally:
            for f in files:
                f.close()
        first, count = None, 0
        for path in paths:
            seen: dict[str, str] = {}
            with path.open(encoding="utf-8") as f:
                for line in f:
                    index, id_, where = json.loads(line)
                    if id_ in seen:
                        count += 1
                        if first is None or index < first[0]:
                            first = (index, id_, where, seen[id_])
                    else:
                        seen[id_] = where
    if first is not None:
        _, id_, where, earlier = first
        raise BidirError(
            f"{count} duplicate id(s) in the input, the first {id_!r} again at {where} (first at {earlier}); "
            "every id must be unique"
        )


def _bucket(id_: str, n: int) -> int:
    # A stable hash (Python's str hash is salted per process); blake2b is fast and well mixed.
    return int.from_bytes(hashlib.blake2b(id_.encode("utf-8", "surrogatepass"), digest_size=8).digest()) % n
