"""Output folders that appear complete or not at all: built under a temporary name, then renamed into place."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bidir_core.artifacts import MANIFEST
from bidir_core.errors import BidirError
from bidir_core.folders import publish_folder


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that holds something other than an export (never replace a user's folder)."""
    if target.exists() and not target.is_dir():
        raise BidirError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not (target / MANIFEST).is_file():
            raise BidirError(f"{target}: exists, is not empty and is not an export; refusing to replace it")
        if not overwrite:
            raise BidirError(f"{target}: an export is already there (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_folder(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to target; when the block finishes without an error it is renamed to
    target (an old export there is moved aside first and deleted last). On an error nothing appears at target."""
    target = Path(target).expanduser().absolute()
    check_target(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as e:
        raise BidirError(f"{target}: cannot write there ({e.strerror or e})") from None
    try:
        yield tmp
        publish_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone when it was renamed into place
