"""Reading the rows (id, text) to embed from JSONL, Parquet or plain-text files, with one-line errors.

Formats, chosen by file suffix:

- `.jsonl` / `.json` / `.ndjson`: one JSON object per line; `id_field` (a string or an integer) and `text_field`
  (a string). Blank lines are not rows and are passed over.
- `.parquet`: columns `id_field` (string or integer) and `text_field` (string), read one record batch at a time.
- anything else: plain text, one document per line (the line's end, \\n or \\r\\n, removed). The id is the
  1-based line number; when a glob matches several text files, the id is `<file name>:<line number>` so ids stay
  unique across files (`<path relative to the folder they share>:<line number>` when two have the same name).

Empty texts are an error (naming file and line), as in text-embeddings-inference: an empty document has no meaning to
embed, and silently embedding only the prompt prefix would give every empty row the same vector.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bidir_core.datasets.lines import parse_json_object, read_lines
from bidir_core.errors import BidirError, one_line

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Row:
    """One document to embed."""

    id: str
    text: str
    where: str
    """file:line (or file row N for Parquet), for error messages."""


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


def file_format(path: Path) -> str:
    """jsonl, parquet or text, by suffix."""
    suffix = path.suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"


def _check_text(text: str, where: str) -> str:
    if not text.strip():
        raise BidirError(f"{where}: empty text (every row needs a non-empty text to embed)")
    return text


def is_blank_jsonl_line(raw: bytes, number: int) -> bool:
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


def _id(value, id_field: str, where: str) -> str:
    # Integer ids are common (BEIR corpora, database keys); they are stored as their decimal string.
    if isinstance(value, str):
        if not value:
            raise BidirError(f"{where}: empty {id_field!r}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BidirError(f"{where}: {id_field!r} is a {type(value).__name__}, not a string or integer")


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


PARQUET_BATCH = 4096


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


def text_rows(path: Path, offset: int, first_line: int, id_prefix: str, digest=None) -> Iterator[Row]:
    """The rows of a plain-text file from byte `offset` (the start of line `first_line`) on: every line is one.
    digest: updated with the raw bytes read (read_lines)."""
    for n, text in read_lines(
        path, offset, first_line, digest
    ):  # UTF-8 checked per line, line endings removed
        yield Row(f"{id_prefix}{n}", _check_text(text, f"{path}:{n}"), f"{path}:{n}")
