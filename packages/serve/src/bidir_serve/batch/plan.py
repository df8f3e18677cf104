"""The plan of a batch-embed job's input: its files, how many rows each holds and where each output shard's rows are,
made without keeping any row (or id) in memory, so any number of ranks or workers can each read only their own shards.

Shard k is rows [k * shard_size, (k + 1) * shard_size) of the input (the files in sorted order, each in row order):
a fixed slice, whatever the number of ranks or Ray workers, so the output is the same for any cluster. Each file's
format (inputs.py) counts its rows and records where reading can start at a shard boundary inside it, and reads a
shard's slice back from there.

The plan also records what each file was when planned, so a file changed while the job runs is refused rather than
embedded half old, half new: its stamp (size, modification and change time, taken before it is read) is checked
where each shard starts and ends reading it (and before the manifest is marked complete, folder.finish); and for
JSONL and text, the counting pass hashes each shard's byte range, which the shard's reader hashes again as it reads:
a rewrite that keeps the size and puts the times back (or that a coarse clock does not show) still differs there.
Parquet files have the stamp only (planning reads their footer, not their bytes).

Validation is not done here: rows are checked where they are read (inputs.py), before their shard is published; ids
are checked unique within a shard here (a set of at most shard_size ids), and across the whole input only with
--check-unique-ids (unique_ids.py).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bidir_core.errors import BidirError, one_line
from bidir_serve.batch.inputs import FORMATS, Layout, Row, changed, file_format, text_id_prefixes


def resolve_inputs(path_or_glob: str | Path) -> list[Path]:
    """The files a path or glob names, sorted (the row order of the job follows it)."""
    text = str(path_or_glob)
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise BidirError(f"{text}: the glob matches no files")
        return files
    path = Path(text).expanduser()
    if not path.is_file():
        raise BidirError(f"{path}: no such file")
    return [path]


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


@dataclass(frozen=True)
class FilePlan:
    """One input file: its rows, where reading can start, and what it was when planned."""

    path: Path
    fmt: str
    """jsonl, parquet or text (inputs.FORMATS)."""
    first_row: int
    """Global index (0-based) of the file's first row."""
    stamp: FileStamp
    """Taken before the file was read for the plan."""
    layout: Layout
    """Its rows and where reading can start, as its format counted them."""
    id_prefix: str = ""
    """Plain text: the prefix of the line-number ids (inputs.text_id_prefixes)."""

    @property
    def rows(self) -> int:
        return self.layout.rows

    def check_unchanged(self) -> None:
        """A BidirError naming the file if its stamp is not the planned one."""
        now = file_stamp(self.path)
        moved = [
            label for name, label in _STAMP_NAMES.items() if getattr(now, name) != getattr(self.stamp, name)
        ]
        if moved:
            raise changed(self.path, f"its {', '.join(moved)} differ from when the job was planned")

    def describe(self) -> dict:
        """The file in the manifest and the job fingerprint: path and stamp; for JSONL / text also a digest of
        every byte from the first row on (of the range digests), so a rerun sees a rewrite whatever its times."""
        out = {"path": str(self.path.resolve()), **dataclasses.asdict(self.stamp)}
        if self.layout.digests:
            out["content_sha256"] = hashlib.sha256("".join(self.layout.digests).encode()).hexdigest()
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
        layout = FORMATS[fmt].count(path, id_field, text_field, first, shard_size)
        planned.append(FilePlan(path, fmt, first, stamp, layout, prefixes.get(path, "")))
        first += layout.rows
    if first == 0:
        raise BidirError(f"{files[0] if len(files) == 1 else 'the inputs'}: no rows to embed")
    return InputPlan(tuple(planned), shard_size)


def _file_rows(f: FilePlan, lo: int, hi: int, id_field: str, text_field: str) -> Iterator[Row]:
    """Rows [lo, hi) of file f (lo a shard boundary or 0), read by its format; the file's stamp is checked before
    and after."""
    f.check_unchanged()
    yield from FORMATS[f.fmt].read(f, lo, hi, id_field, text_field)
    f.check_unchanged()


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
