"""Reading data files line by line with one-line errors that name the file and line (shared by every reader)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from bidir_core.errors import BidirError, one_line


def read_lines(path: Path, offset: int = 0, first_line: int = 1, digest=None) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its line ending) for each line of a UTF-8 file, blank lines included.

    Bytes are decoded line by line, so invalid UTF-8 is reported at its line rather than as a file offset. offset:
    start at this byte, which begins line first_line (a reader of one slice of the file, such as a batch-embed rank).
    digest: an object with update(bytes) (a hashlib hash), given each line's raw bytes before the line is yielded,
    so a caller can check that what it read is what it expected.
    """
    if not path.is_file():
        raise BidirError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            f.seek(offset)
            for number, raw in enumerate(f, start=first_line):
                if digest is not None:
                    digest.update(raw)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BidirError(f"{path}:{number}: invalid UTF-8 ({one_line(e)})") from None
                if number == 1:
                    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first field
                yield number, text.rstrip("\r\n")
    except OSError as e:
        raise BidirError(f"{path}: cannot read ({one_line(e)})") from None


# A JSON \\u escape of a UTF-16 surrogate (D800-DFFF): the only way a JSON line can carry a lone surrogate, which
# is valid JSON but no text (it cannot be encoded to UTF-8, so the tokenizer fails on it mid-job). Matches can be
# false alarms (a surrogate pair, an escaped backslash); _check_surrogates looks closer.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; every line must be a JSON object, and
    its strings must be text (no lone surrogate escape such as "\\ud83d", a truncated emoji)."""
    for number, text in read_lines(path):
        if text.strip():
            yield number, parse_json_object(text, f"{path}:{number}")


def parse_json_object(text: str, where: str) -> dict:
    """One JSON Lines line -> its object, with read_jsonl's checks; errors start with where (file:line)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise BidirError(f"{where}: not valid JSON ({one_line(e)})") from None
    except RecursionError:
        raise BidirError(f"{where}: JSON nested too deeply to read") from None
    if not isinstance(row, dict):
        raise BidirError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if _SURROGATE_ESCAPE.search(text):
        _check_surrogates(row, where)
    return row


def _check_surrogates(row: dict, where: str) -> None:
    for key, value in row.items():
        try:
            json.dumps([key, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BidirError(
                f'{where}: field {key!r} holds a lone surrogate escape (e.g. "\\ud83d", half of an emoji), '
                "which is not text"
            ) from None


def text_field(row: dict, key: str, where: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """row[key] as a str; a BidirError naming `where` (path:line) and the key when missing, not a str or empty."""
    if key not in row:
        if required:
            raise BidirError(f"{where}: missing field {key!r}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise BidirError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BidirError(f"{where}: field {key!r} is empty")
    return value


def id_field(row: dict, key: str, where: str) -> str:
    """A document or query id: a non-empty string, or an integer (read as its decimal string, as BEIR does)."""
    if key not in row:
        raise BidirError(f"{where}: missing field {key!r}")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BidirError(f"{where}: field {key!r} must be a string id, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise BidirError(f"{where}: field {key!r} is empty")
    return value
