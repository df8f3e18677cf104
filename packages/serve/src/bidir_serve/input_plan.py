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

The plan also records what each file was when planned, so a file changed while the job runs is refused rather than
embedded half old, half new: its stamp (size, modification and change time, taken before it is read) is checked
where each shard starts and ends reading it (and before the manifest is marked complete, job_folder.finish); and for
JSONL and text, the counting pass hashes each shard's byte range, which the shard's reader hashes again as it reads:
a rewrite that keeps the size and puts the times back (or that a coarse clock does not show) still differs there.
Parquet files have the stamp only (planning reads their footer, not their bytes).

Validation is not done here: rows are checked where they are read (bidir_serve.inputs), before their shard is
published; ids are checked unique within a shard there (a set of at most shard_size ids), and across the whole input
only with --check-unique-ids (bidir_serve.unique_ids).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
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
class FileStamp:
    """What stat says of a file. Writing it moves the modification time, and the change time too, which no user can
    set back (os.utime sets the modification time and moves the change time to now)."""

    size: int
    mtime_ns: int
    ctime_ns: int


_STAMP_NAMES = {"size": "size", "mtime_ns": "modification time", "ctime_ns": "change time"}


def file_stamp(path: Path) -> FileStamp:
    try:
        st = path.stat()
    except OSError as e:
        raise BidirError(f"{path}: cannot read ({one_line(e)})") from None
    return FileStamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _changed(path: Path, what: str) -> BidirError:
    return BidirError(
        f"{path}: changed during the job ({what}); nothing read since is written and the job is not marked "
        "complete: rerun with --overwrite once the file no longer changes"
    )


@dataclass(frozen=True)
class FilePlan:
    """One input file: its rows, where reading can start, and what it was when planned."""

    path: Path
    fmt: str
    """jsonl, parquet or text."""
    first_row: int
    """Global index (0-based) of the file's first row."""
    rows: int
    stamp: FileStamp
    """Taken before the file was read for the plan."""
    id_prefix: str = ""
    """Plain text: the prefix of the line-number ids (bidir_serve.inputs.text_id_prefixes)."""
    row_groups: tuple[int, ...] = ()
    """Parquet: rows of each row group."""
    starts: tuple[tuple[int, int, int], ...] = ((0, 0, 1),)
    """JSONL / text: (row in file, byte offset, line number) of the file's first row and of every shard's first row
    inside the file, in order."""
    digests: tuple[str, ...] = ()
    """JSONL / text: sha256 of each range of bytes from one start to the next (the last: to the end of the file)."""

    def check_unchanged(self) -> None:
        """A BidirError naming the file if its stamp is not the planned one."""
        now = file_stamp(self.path)
        moved = [
            label for name, label in _STAMP_NAMES.items() if getattr(now, name) != getattr(self.stamp, name)
        ]
        if moved:
            raise _changed(self.path, f"its {', '.join(moved)} differ from when the job was planned")

    def describe(self) -> dict:
        """The file in the manifest and the job fingerprint: path and stamp; for JSONL / text also a digest of
        every byte from the first row on (of the range digests), so a rerun sees a rewrite whatever its times."""
        out = {"path": str(self.path.resolve()), **dataclasses.asdict(self.stamp)}
        if self.digests:
            out["content_sha256"] = hashlib.sha256("".join(self.digests).encode()).hexdigest()
        return out


@dataclass(frozen=True)
class InputPlan:
    files: tuple[FilePlan, ...]
    shard_size: int

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def fingerprint(self) -> tuple[str, list[dict]]:
        """sha256 over every file's description (FilePlan.describe), and the descriptions."""
        described = [f.describe() for f in self.files]
        digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
        return "sha256:" + digest, described

    def check_unchanged(self) -> None:
        for f in self.files:
            f.check_unchanged()

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
        stamp = file_stamp(path)  # before reading: a write during the read moves it
        if fmt == "parquet":
            meta = open_parquet(path, id_field, text_field).metadata
            groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
            planned.append(FilePlan(path, fmt, first, sum(groups), stamp, row_groups=groups))
        else:
            rows, starts, digests = _count_lines(path, fmt == "jsonl", first, shard_size)
            prefix = prefixes.get(path, "")
            planned.append(FilePlan(path, fmt, first, rows, stamp, prefix, starts=starts, digests=digests))
        first += planned[-1].rows
    if first == 0:
        raise BidirError(f"{files[0] if len(files) == 1 else 'the inputs'}: no rows to embed")
    return InputPlan(tuple(planned), shard_size)


def _count_lines(path: Path, jsonl: bool, first_row: int, shard_size: int):
    """Rows of a JSONL (non-blank lines) or text (every line) file, the starts of the shards inside it, and the
    digest of each start's range of bytes (blank lines after a range's last row belong to it)."""
    starts, digests = [(0, 0, 1)], []
    digest = None  # of the current range; none before the first row (leading blank lines are in no range)
    rows = offset = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not (jsonl and is_blank_jsonl_line(raw, number)):
                    if rows and (first_row + rows) % shard_size == 0:
                        starts.append((rows, offset, number))
                        digests.append(digest.hexdigest())
                        digest = hashlib.sha256()
                    elif not rows:
                        starts[0] = (0, offset, number)
                        digest = hashlib.sha256()
                    rows += 1
                if digest is not None:
                    digest.update(raw)
                offset += len(raw)
    except OSError as e:
        raise BidirError(f"{path}: cannot read ({one_line(e)})") from None
    if digest is not None:
        digests.append(digest.hexdigest())
    return rows, tuple(starts), tuple(digests)


class _Digest:
    """sha256 of the bytes given, and how many there were."""

    def __init__(self):
        self._sha = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _file_rows(f: FilePlan, lo: int, hi: int, id_field: str, text_field: str) -> Iterator[Row]:
    """Rows [lo, hi) of file f (lo a shard boundary or 0); Parquet: only the row groups that hold them are read.
    The file's stamp is checked before and after, and (JSONL / text) the bytes read against the plan's digest."""
    f.check_unchanged()
    if f.fmt == "parquet":
        ends = list(itertools.accumulate(f.row_groups))
        g = bisect.bisect_right(ends, lo)  # the row group holding row lo
        last = bisect.bisect_left(ends, hi)  # the row group holding row hi - 1
        begin = ends[g - 1] if g else 0
        rows = parquet_rows(f.path, list(range(g, last + 1)), begin, id_field, text_field)
        yield from itertools.islice(rows, lo - begin, hi - begin)
    else:
        i = (
            bisect.bisect_right([s[0] for s in f.starts], lo) - 1
        )  # lo is a start: range i is [lo, hi) exactly
        row, offset, line = f.starts[i]
        digest = _Digest()
        if f.fmt == "jsonl":
            rows = jsonl_rows(f.path, offset, line, id_field, text_field, digest)
        else:
            rows = text_rows(f.path, offset, line, f.id_prefix, digest)
        n = 0
        for row_ in itertools.islice(rows, lo - row, hi - row):
            n += 1
            yield row_
        if n == hi - lo:  # fewer rows: shard_rows says so
            _check_range(f, i, offset, digest, lo, hi)
    f.check_unchanged()


def _check_range(f: FilePlan, i: int, offset: int, digest: _Digest, lo: int, hi: int) -> None:
    """Range i's digest (the bytes read, then those after its last row: blank lines) against the plan's."""
    end = f.starts[i + 1][1] if i + 1 < len(f.starts) else f.stamp.size
    rest = end - offset - digest.size
    try:
        with f.path.open("rb") as file:
            file.seek(offset + digest.size)
            digest.update(file.read(max(rest, 0)))
    except OSError as e:
        raise BidirError(f"{f.path}: cannot read ({one_line(e)})") from None
    if rest < 0 or digest.size != end - offset or digest.hexdigest() != f.digests[i]:
        raise _changed(f.path, f"the bytes of rows {lo + 1}..{hi} differ from when the job was planned")


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
