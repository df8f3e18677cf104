"""Artifact folders that appear complete or not at all: built under a temporary name next to the target, then
renamed into place (checkpoints here, exports and engines in bidir-export)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def publish_folder(tmp: Path, target: Path) -> None:
    """Rename the finished folder tmp to target. A non-empty target is first moved aside, so at every moment target
    is either the complete old or the complete new folder; the old one is deleted last. Raises OSError (with the
    old folder back in place) when the rename fails, e.g. because another process published to target first."""
    old = None
    if target.is_dir() and any(target.iterdir()):
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old)
    try:
        os.replace(tmp, target)  # replaces an empty folder; fails on a non-empty one
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
