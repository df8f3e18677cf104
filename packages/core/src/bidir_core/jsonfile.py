"""The small JSON files of every artifact (config.json, bidir.json, manifests, reports): reading them with one-line
errors, and writing them so they are never half-written."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from bidir_core.errors import BidirError, one_line
from bidir_core.file_writes import create_temp_file, fsync_dir


def read_json_object(path: Path) -> dict:
    """The JSON object in path; a BidirError naming the file when it is not valid JSON or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BidirError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(value, dict):
        raise BidirError(f"{path}: expected a JSON object")
    return value


def read_versioned_json(path: Path, format_version: int) -> dict:
    """The one reader of an artifact's metadata file (bidir.json, manifest.json): its JSON object without the
    format_version key, which must be format_version; a BidirError naming the file otherwise."""
    raw = read_json_object(path)
    version = raw.pop("format_version", None)
    if version != format_version:
        raise BidirError(
            f"{path}: format_version {version!r} is not one this bidir-core reads ({format_version})"
        )
    return raw


T = TypeVar("T")


def parse_fields(path: Path, build: Callable[[], T]) -> T:
    """build() (a dataclass made from path's keys) with its errors as one line naming path: a missing key
    (KeyError), an unknown or missing field (TypeError), a field its own check refuses (BidirError)."""
    try:
        return build()
    except KeyError as e:
        raise BidirError(f"{path}: missing key {e.args[0]!r}") from None
    except TypeError as e:
        raise BidirError(f"{path}: {one_line(e)}") from None
    except BidirError as e:
        raise BidirError(f"{path}: {e}") from None


def write_json_atomic(path: Path, value) -> Path:
    """Write value as indented JSON to a temporary file next to path and rename it into place, so path is either
    the old file or the complete new one, also after a power loss (the file is fsynced before the rename and the
    folder after it); the temporary file is removed on any error. The file gets the permissions a plain write
    would give it (file_writes.create_temp_file)."""
    return _write_atomic(path, [json.dumps(value, indent=2, ensure_ascii=False) + "\n"])


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line (JSON Lines), atomically as write_json_atomic does."""
    return _write_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_atomic(path: Path, chunks: Iterable[str]) -> Path:
    """chunks (possibly a lazy generator: a failure while producing one also removes the temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
