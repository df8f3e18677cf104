"""The output folder of an export (ONNX or TensorRT): never a folder that is not an earlier export of the same kind
(check_target), and complete or absent (staged_folder: built under a temporary name, then renamed into place with
bidir_core.folders)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from bidir_core.artifacts import artifact_files, read_manifest
from bidir_core.errors import BidirError, one_line
from bidir_core.folders import finish_interrupted_publish, publish_folder, start_writing, unknown_files

KINDS = {"onnx": "an ONNX export", "tensorrt": "a TensorRT engine folder"}


def check_target(target: Path, overwrite: bool, kind: str) -> None:
    """Refuse a non-empty target unless it is an earlier artifact of this kind ("onnx" or "tensorrt") holding only
    the files such an artifact has, and overwrite is given: a user's folder, an embeddings folder or an export of
    the other kind is never replaced."""
    if target.exists() and not target.is_dir():
        raise BidirError(f"{target}: exists and is not a folder")
    if not target.is_dir() or not any(target.iterdir()):
        return
    what = KINDS[kind]
    try:
        manifest = read_manifest(target, kind)
    except (
        BidirError,
        TypeError,
        ValueError,
        AttributeError,
    ) as e:  # a manifest the reader cannot even parse
        raise BidirError(
            f"{target}: exists, is not empty and is not {what} ({one_line(e)}); refusing to replace it"
        ) from None
    if unknown := unknown_files(target, artifact_files(manifest)):
        raise BidirError(
            f"{target}: holds {unknown[0]}"
            + (f" and {len(unknown) - 1} more file(s)" if len(unknown) > 1 else "")
            + f", which {what} does not have; refusing to replace it"
        )
    if not overwrite:
        raise BidirError(f"{target}: {what} is already there (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_folder(target: str | Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to target; when the block finishes without an error it is renamed to
    target (an old export there is moved aside first and deleted last). On an error nothing appears at target.
    Temporary folders that killed runs left beside target are removed first (bidir_core.folders.remove_stale_temps).
    """
    target = Path(target).expanduser().absolute()
    finish_interrupted_publish(
        target
    )  # an earlier export killed while replacing target: checked as what it is
    check_target(target, overwrite, kind)
    tmp = start_writing(target)
    try:
        yield tmp
        # Again at the end: an export can take many minutes, and what appeared in target meanwhile is not ours.
        check_target(target, True, kind)
        publish_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone when it was renamed into place
