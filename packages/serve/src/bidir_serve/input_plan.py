"""The plan of a batch-embed job's input: how many rows each file holds and where each output shard's rows are, made
without keeping any row (or id) in memory, so any number of ranks or workers can each read only their own shards.

Shard k is rows [k * shard_size, (k + 1) * shard_size) of the input (the files in sorted order, each in row order):
a fixed slice, whatever the number of ranks or Ray workers, so the output is the same for any cluster. The plan
holds, per file, its row count and a way to start reading at a shard boundary inside it:

- Parquet: the row count of each row group, from the footer alone (no row is read). A shard's rows start inside
  one row group; its reader reads from that row group on and skips the rows before the slice in it (at most one
  row group's worth).
- JSONL and plain text: one counting pass over the bytes (lines, not JSON: no row is decoded or kept), which records
  the byte offset and line number at which each shard's first row starts. Byte ranges alone (cut the file at
  every N MiB) would need no pass, but a shard's row count would then be known only once it is read, and the
  manifest (which bidir-eval checks) states each shard's rows up front; the pass costs one sequential read (rank 0
  only), memory is one entry per shard.

Validation is not done here: rows are checked where they are read (bidir_serve.inputs), before their shard is
published; ids are checked unique within a shard there (a set of at most shard_size ids), and across the whole input
only with --check-unique-ids (bidir_serve.unique_ids).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bidir_core.errors import BidirError, one_line
from bidir_serve.inputs import (
    Row,
    file_format,
    is_blank_jsonl_line,
    jsonl_rows,
    open_parquet,
    parquet_rows,
    text_id_prefixes,
    text_rows,
)


@dataclass(frozen=True)
class FilePlan:
    """One input file: its rows and where reading can start."""

    path: Path
    fmt: str
    """jsonl, parquet or text."""
    first_row: int
    """Global index (0-based) of the file's first row."""
    rows: int
    id_prefix: str = ""
    """Plain text: the prefix of the line-number ids (bidir_serve.inputs.text_id_prefixes)."""
    row_groups: tuple[int, ...] = ()
    """Parquet: rows of each row group."""
    starts: tuple[tuple[int, int, int], ...] = ((0, 0, 1),)
    """JSONL / text: (row in file, byte offset, line number) of the file's first row and of every shard's first row
    inside the file, in order."""


@dataclass(frozen=True)
class InputPlan:
    files: tuple[FilePlan, ...]
    shard_size: int

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def n_shards(self) -> int:
        return (self.rows + self.shard_size - 1) // self.shard_size

    def shard_rows(self, k: int) -> int:
        return min(self.shard_size, self.rows - k * self.shard_size)

    def slices(self, k: int) -> list[tuple[FilePlan, int, int]]:
        """(file, first row, end row) inside each file that shard k's rows come from, in order."""
        start, end = k * self.shard_size, k * self.shard_size + self.shard_size
        out = []
        for f in self.files:
            lo, hi = max(start, f.first_row), min(end, f.first_row + f.rows)
            if lo < hi:
                out.append((f, lo - f.first_row, hi - f.first_row))
        return out


def plan_inputs(files: list[Path], id_field: str, text_field: str, shard_size: int) -> InputPlan:
    """The plan of `files` (sorted, as resolve_inputs gives them); a Parquet file with the wrong columns, an
    unreadable file or an input with no rows is an error here, before any work."""
    prefixes = text_id_prefixes([p for p in files if file_format(p) == "text"])
    planned, first = [], 0
    for path in files:
        fmt = file_format(path)
        if fmt == "parquet":
            meta = open_parquet(path, id_field, text_field).metadata
            groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
            planned.append(FilePlan(path, fmt, first, sum(groups), row_groups=groups))
        else:
            rows, starts = _count_lines(path, fmt == "jsonl", first, shard_size)
            planned.append(FilePlan(path, fmt, first, rows, prefixes.get(path, ""), starts=starts))
        first += planned[-1].rows
    if first == 0:
        raise BidirError(f"{files[0] if len(files) == 1 else 'the inputs'}: no rows to embed")
    return InputPlan(tuple(planned), shard_size)


def _count_lines(path: Path, jsonl: bool, first_row: int, shard_size: int):
    """Rows of a JSONL (non-blank lines) or text (every line) file, and the starts of the shards inside it."""
    starts = [(0, 0, 1)]
    rows = offset = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not (jsonl and is_blank_jsonl_line(raw, number)):
                    if rows and (first_row + rows) % shard_size == 0:
                        starts.append((rows, offset, number))
                    elif not rows:
                        starts[0] = (0, offset, number)
                    rows += 1
                offset += len(raw)
    except OSError as e:
        raise BidirError(f"{path}: cannot read ({one_line(e)})") from None
    return rows, tuple(starts)


def _file_rows(f: FilePlan, lo: int, hi: int, id_field: str, text_field: str) -> Iterator[Row]:
    """Rows [lo, hi) of file f (lo a shard boundary or 0); Parquet: only the row groups that hold them are read."""
    if f.fmt == "parquet":
        ends = list(itertools.accumulate(f.row_groups))
        g = bisect.bisect_right(ends, lo)  # the row group holding row lo
        last = bisect.bisect_left(ends, hi)  # the row group holding row hi - 1
        begin = ends[g - 1] if g else 0
        rows = parquet_rows(f.path, list(range(g, last + 1)), begin, id_field, text_field)
        return itertools.islice(rows, lo - begin, hi - begin)
    i = bisect.bisect_right([s[0] for s in f.starts], lo) - 1
    row, offset, line = f.starts[i]
    if f.fmt == "jsonl":
        rows = jsonl_rows(f.path, offset, line, id_field, text_field)
    else:
        rows = text_rows(f.path, offset, line, f.id_prefix)
    return itertools.islice(rows, lo - row, hi - row)


def shard_rows(plan: InputPlan, k: int, id_field: str, text_field: str) -> Iterator[Row]:
    """The rows of shard k, reading only its slices; a duplicate id inside the shard, or a file whose rows no
    longer match the plan (changed during the job), is an error naming file and line."""
    seen: set[str] = (
        set()
    )  # this shard's ids only (at most shard_size); places are found again on a duplicate
    for f, lo, hi in plan.slices(k):
        n = 0
        for row in _file_rows(f, lo, hi, id_field, text_field):
            if row.id in seen:
                first = next(r.where for r in _slices_rows(plan, k, id_field, text_field) if r.id == row.id)
                raise BidirError(
                    f"duplicate id {row.id!r} again at {row.where} (first at {first}); every id must be unique"
                )
            seen.add(row.id)
            n += 1
            yield row
        if n != hi - lo:
            raise BidirError(
                f"{f.path}: fewer rows than the {f.rows} it had when the job was planned (it changed during "
                "the job); rerun to plan it again"
            )


def _slices_rows(plan: InputPlan, k: int, id_field: str, text_field: str) -> Iterator[Row]:
    for f, lo, hi in plan.slices(k):
        yield from _file_rows(f, lo, hi, id_field, text_field)
