"""Checking that an output can be written before the work that produces it (minutes or hours of compute)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bidir_core.errors import BidirError, one_line


def check_writable(path: str | Path) -> None:
    """A BidirError naming path when a file could not be created there: path is a folder, or its nearest existing
    folder is not a folder or refuses a new file (read-only, no permission, a file in the way). Creates nothing
    that stays: a temporary file is made and removed in that folder (os.access would not do: root passes it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise BidirError(f"{path}: is a folder, not a file that can be written")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BidirError(f"{path}: cannot be written ({folder} is not a folder)")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".bidir-write-check-"):
            pass
    except OSError as e:
        raise BidirError(f"{path}: cannot be written ({one_line(e)})") from None


def check_new_output(path: str | Path, *, overwrite: bool) -> None:
    """check_writable, and refuse a path that already exists unless overwrite: an output file a command would
    replace is the user's until they say otherwise."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise BidirError(f"{path}: already exists (pass --overwrite / overwrite=True to replace it)")
    check_writable(path)
