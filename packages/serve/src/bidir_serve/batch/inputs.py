"""The input formats of batch-embed, one section each, and FORMATS, their table: which files are the format, how
planning counts a file's rows and records where each shard starts inside it (`count`, on rank 0, keeping no row), and
how a shard's slice of the file is read back as rows (id, text), validated as read with one-line errors (`read`).

- JSONL (`.jsonl` / `.json` / `.ndjson`): one JSON object per line; `id_field` (a string or an integer) and
  `text_field` (a string). Blank lines are not rows and are passed over. Counted by one pass over the bytes (lines,
  not JSON: no row is decoded), which records the byte offset and line number at which each shard's first row
  starts and hashes each shard's byte range; a shard's reader starts at its offset and hashes the bytes it reads.
- Parquet (`.parquet`): columns `id_field` (string or integer) and `text_field` (string), read one record batch at a
  time. Counted from the footer alone (the rows of each row group); a shard's reader starts at the row group holding
  its first row and skips the rows before it (at most one row group's worth). No digest: planning reads no bytes.
- plain text (anything else): one document per line (the line's end, \\n or \\r\\n, removed). The id is the
  1-based line number; when a glob matches several text files, the id is `<file name>:<line number>` so ids stay
  unique across files (`<path relative to the folder they share>:<line number>` when two have the same name).
  Counted and read like JSONL, every line a row.

A counting pass for the line formats, not byte ranges (cut the file every N MiB, no pass): a shard's row count would
then be known only once it is read, and the manifest (which bidir-eval checks) states each shard's rows up front; the
pass costs one sequential read, and memory is one entry per shard.

Empty texts are an error (naming file and line), as in text-embeddings-inference: an empty document has no meaning to
embed, and silently embedding only the prompt prefix would give every empty row the same vector.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bidir_core.datasets.lines import parse_json_object, read_lines
from bidir_core.errors import BidirError, one_line

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
PARQUET_BATCH = 4096


@dataclass(frozen=True)
class Row:
    """One document to embed."""

    id: str
    text: str
    where: str
    """file:line (or file row N for Parquet), for error messages."""


@dataclass(frozen=True)
class Layout:
    """A file's rows and where reading can start inside it: what its format's count records and its reader starts
    from."""

    rows: int
    row_groups: tuple[int, ...] = ()
    """Parquet: rows of each row group."""
    starts: tuple[tuple[int, int, int], ...] = ((0, 0, 1),)
    """JSONL / text: (row in file, byte offset, line number) of the file's first row and of every shard's first row
    inside the file, in order."""
    digests: tuple[str, ...] = ()
    """JSONL / text: sha256 of each range of bytes from one start to the next (the last: to the end of the file)."""


def changed(path: Path, what: str) -> BidirError:
    """The error of an input found changed since the job planned it."""
    return BidirError(
        f"{path}: changed during the job ({what}); nothing read since is written and the job is not marked "
        "complete: rerun with --overwrite once the file no longer changes"
    )


def _check_text(text: str, where: str) -> str:
    if not text.strip():
        raise BidirError(f"{where}: empty text (every row needs a non-empty text to embed)")
    return text


def _id(value, id_field: str, where: str) -> str:
    # Integer ids are common (BEIR corpora, database keys); they are stored as their decimal string.
    if isinstance(value, str):
        if not value:
            raise BidirError(f"{where}: empty {id_field!r}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BidirError(f"{where}: {id_field!r} is a {type(value).__name__}, not a string or integer")


# JSONL


def _is_blank_jsonl_line(raw: bytes, number: int) -> bool:
    """Whether a raw line of a JSONL file is blank (not a row), exactly as the reader decides it."""
    head = raw.lstrip(b" \t")
    if head[:1] == b"{":  # the common case, decided without decoding
        return False
    text = raw.decode("utf-8", "replace")
    return not (text.removeprefix("\ufeff") if number == 1 else text).strip()


def jsonl_rows(
    path: Path, offset: int, first_line: int, id_field: str, text_field: str, digest=None
) -> Iterator[Row]:
    """The rows of a JSONL file from byte `offset` (the start of line `first_line`) on; blank lines are not rows.
    digest: updated with the raw bytes read (read_lines)."""
    for n, text in read_lines(path, offset, first_line, digest):
        if not text.strip():
            continue
        where = f"{path}:{n}"
        obj = parse_json_object(text, where)
        for field in (id_field, text_field):
            if field not in obj:
                raise BidirError(
                    f"{where}: no {field!r} field (fields: {', '.join(map(repr, obj)) or 'none'})"
                )
        text = obj[text_field]
        if not isinstance(text, str):
            raise BidirError(f"{where}: {text_field!r} is a {type(text).__name__}, not a string")
        yield Row(_id(obj[id_field], id_field, where), _check_text(text, where), where)


def _count_jsonl(path: Path, id_field: str, text_field: str, first_row: int, shard_size: int) -> Layout:
    return _count_lines(path, True, first_row, shard_size)


def _read_jsonl(f, lo: int, hi: int, id_field: str, text_field: str) -> Iterator[Row]:
    return _read_lines(
        f, lo, hi, lambda offset, line, digest: jsonl_rows(f.path, offset, line, id_field, text_field, digest)
    )


# Parquet


def open_parquet(path: Path, id_field: str, text_field: str):
    """The pyarrow ParquetFile, its schema checked (columns present, of the right types) from the footer alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise BidirError(f"{path}: not a readable Parquet file ({one_line(e)})") from None
    for field, ok in (
        (id_field, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)),
        (text_field, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    ):
        if field not in schema.names:
            raise BidirError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)})")
        if not ok(schema.field(field).type):
            kind = "string or integer" if field == id_field else "string"
            raise BidirError(f"{path}: column {field!r} is {schema.field(field).type}, not a {kind}")
    return pf


def parquet_rows(
    path: Path, groups: list[int], first_row: int, id_field: str, text_field: str
) -> Iterator[Row]:
    """The rows of row groups `groups` (consecutive) of a Parquet file, whose first row is file row `first_row`
    (0-based); only those row groups are read."""
    import pyarrow as pa

    pf = open_parquet(path, id_field, text_field)
    row = first_row
    # one column may be both the id and the text (each text its own id): read it once, take both by name
    columns = list(dict.fromkeys([id_field, text_field]))
    batches = pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups, columns=columns)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                break
            # to_pylist decodes the strings: invalid UTF-8 raises UnicodeDecodeError, not an ArrowException
            ids = batch.column(id_field).to_pylist()
            texts = ids if text_field == id_field else batch.column(text_field).to_pylist()
        except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
            raise BidirError(
                f"{path} rows {row + 1}..{row + PARQUET_BATCH}: cannot read ({one_line(e)}); "
                "e.g. a string column holding invalid UTF-8"
            ) from None
        for id_, text in zip(ids, texts, strict=True):
            row += 1
            where = f"{path} row {row}"
            if id_ is None or text is None:
                raise BidirError(f"{where}: {(id_field if id_ is None else text_field)!r} is null")
            yield Row(_id(id_, id_field, where), _check_text(text, where), where)


def _count_parquet(path: Path, id_field: str, text_field: str, first_row: int, shard_size: int) -> Layout:
    meta = open_parquet(path, id_field, text_field).metadata
    groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
    return Layout(sum(groups), row_groups=groups)


def _read_parquet(f, lo: int, hi: int, id_field: str, text_field: str) -> Iterator[Row]:
    """Only the row groups that hold rows [lo, hi) are read."""
    ends = list(itertools.accumulate(f.layout.row_groups))
    g = bisect.bisect_right(ends, lo)  # the row group holding row lo
    last = bisect.bisect_left(ends, hi)  # the row group holding row hi - 1
    begin = ends[g - 1] if g else 0
    rows = parquet_rows(f.path, list(range(g, last + 1)), begin, id_field, text_field)
    yield from itertools.islice(rows, lo - begin, hi - begin)


# Plain text


def text_id_prefixes(text_files: list[Path]) -> dict[Path, str]:
    """The id prefix of each plain-text file's line numbers: none for a single file; the file name when the names
    differ (the common case, and the ids earlier versions gave); else the path relative to the folder the files
    share (docs/a.txt and notes/a.txt -> "docs/a.txt:1", "notes/a.txt:1"), so two files of one name never collide."""
    if len(text_files) <= 1:
        return dict.fromkeys(text_files, "")
    if len({p.name for p in text_files}) == len(text_files):
        return {p: p.name + ":" for p in text_files}
    absolute = [p.resolve() for p in text_files]
    common = Path(os.path.commonpath([p.parent for p in absolute]))
    return {p: a.relative_to(common).as_posix() + ":" for p, a in zip(text_files, absolute, strict=True)}


def text_rows(path: Path, offset: int, first_line: int, id_prefix: str, digest=None) -> Iterator[Row]:
    """The rows of a plain-text file from byte `offset` (the start of line `first_line`) on: every line is one.
    digest: updated with the raw bytes read (read_lines)."""
    for n, text in read_lines(path, offset, first_line, digest):  # UTF-8 checked per line, endings removed
        yield Row(f"{id_prefix}{n}", _check_text(text, f"{path}:{n}"), f"{path}:{n}")


def _count_text(path: Path, id_field: str, text_field: str, first_row: int, shard_size: int) -> Layout:
    return _count_lines(path, False, first_row, shard_size)


def _read_text(f, lo: int, hi: int, id_field: str, text_field: str) -> Iterator[Row]:
    return _read_lines(
        f, lo, hi, lambda offset, line, digest: text_rows(f.path, offset, line, f.id_prefix, digest)
    )


# JSONL and plain text: files of lines


def _count_lines(path: Path, jsonl: bool, first_row: int, shard_size: int) -> Layout:
    """Rows of a JSONL (non-blank lines) or text (every line) file, the starts of the shards inside it, and the
    digest of each start's range of bytes (blank lines after a range's last row belong to it)."""
    starts, digests = [(0, 0, 1)], []
    digest = None  # of the current range; none before the first row (leading blank lines are in no range)
    rows = offset = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not (jsonl and _is_blank_jsonl_line(raw, number)):
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
    return Layout(rows, starts=tuple(starts), digests=tuple(digests))


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


def _read_lines(f, lo: int, hi: int, rows_from: Callable) -> Iterator[Row]:
    """Rows [lo, hi) of a file of lines, lo being one of its starts; rows_from(offset, line, digest) reads the rows
    from a start on. Once all are read, their range's bytes are checked against the plan's digest."""
    i = (
        bisect.bisect_right([s[0] for s in f.layout.starts], lo) - 1
    )  # lo is a start: range i is [lo, hi) exactly
    row, offset, line = f.layout.starts[i]
    digest = _Digest()
    n = 0
    for row_ in itertools.islice(rows_from(offset, line, digest), lo - row, hi - row):
        n += 1
        yield row_
    if n == hi - lo:  # fewer rows: plan.shard_rows says so
        _check_range(f, i, offset, digest, lo, hi)


def _check_range(f, i: int, offset: int, digest: _Digest, lo: int, hi: int) -> None:
    """Range i's digest (the bytes read, then those after its last row: blank lines) against the plan's."""
    starts = f.layout.starts
    end = starts[i + 1][1] if i + 1 < len(starts) else f.stamp.size
    rest = end - offset - digest.size
    try:
        with f.path.open("rb") as file:
            file.seek(offset + digest.size)
            digest.update(file.read(max(rest, 0)))
    except OSError as e:
        raise BidirError(f"{f.path}: cannot read ({one_line(e)})") from None
    if rest < 0 or digest.size != end - offset or digest.hexdigest() != f.layout.digests[i]:
        raise changed(f.path, f"the bytes of rows {lo + 1}..{hi} differ from when the job was planned")


@dataclass(frozen=True)
class Format:
    """One input format. Its functions take the field names; `read` takes the file's plan (plan.FilePlan: path,
    stamp, id_prefix and the Layout that `count` made) and rows [lo, hi) of the file, lo 0 or a shard's first row."""

    suffixes: tuple[str, ...]
    count: Callable[[Path, str, str, int, int], Layout]
    """(path, id_field, text_field, global index of the file's first row, shard_size) -> the file's Layout."""
    read: Callable[..., Iterator[Row]]
    """(file plan, lo, hi, id_field, text_field) -> rows [lo, hi) of the file."""


FORMATS = {
    "jsonl": Format(JSONL_SUFFIXES, _count_jsonl, _read_jsonl),
    "parquet": Format(PARQUET_SUFFIXES, _count_parquet, _read_parquet),
    "text": Format((), _count_text, _read_text),  # anything else
}


def file_format(path: Path) -> str:
    """jsonl, parquet or text, by suffix."""
    suffix = path.suffix.lower()
    return next((name for name, fmt in FORMATS.items() if suffix in fmt.suffixes), "text")
