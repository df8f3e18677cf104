"""Reading the small JSON files of every artifact (config.json, bidir.json, manifests) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from bidir_core.errors import BidirError, one_line


def read_json_object(path: Path) -> dict:
    """The JSON object in path; a BidirError naming the file when it is not valid JSON or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BidirError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(value, dict):
        raise BidirError(f"{path}: expected a JSON object")
    return value
