"""Artifact folders that appear complete or not at all: built under a temporary name next to the target, then
renamed into place (checkpoints here, exports and engines in bidir-export, training's final/ in bidir-train).

    tmp = start_writing(target)         # stale temps removed, then .<target>.tmp-<host>-<pid>-XXXXXXXX beside it
    ... write into tmp ...
    publish_folder(tmp, target)         # fsynced, then renamed into place

remove_stale_temps(target) deletes the temporary folders a killed writer left beside target (they can hold
gigabytes of weights); start_writing calls it before it makes the new one. Only names of exactly this pattern are
touched.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from bidir_core.errors import BidirError

# Files a Hugging Face tokenizer's save_pretrained writes: the artifacts that carry a tokenizer may hold these
# (checked before a folder is replaced, so a folder with anything else in it is never deleted).
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
    }
)

# A folder whose writer left no trace of its host and pid (written before those were part of the name) counts as
# stale once nothing in it has changed for this long.
UNOWNED_STALE_SECONDS = 24 * 3600


def unknown_files(folder: Path, patterns: frozenset[str] | set[str]) -> list[str]:
    """The files under folder (relative paths, sorted) that match none of the fnmatch patterns: what a writer
    that replaces folder did not write itself, so must not delete."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            rel = Path(root, name).relative_to(folder).as_posix()
            if not any(fnmatch.fnmatchcase(rel, pattern) for pattern in patterns):
                found.append(rel)
    return sorted(found)


def start_writing(target: Path) -> Path:
    """The empty temporary folder a new version of target is written in, beside target: target's parent is made if
    needed and what killed writers of target left there is removed first. An OSError (no permission, a file in
    the way) is one line naming target."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        # A unique name: torchrun ranks on several hosts may write into one shared folder at once.
        return make_temp_folder(target)
    except OSError as e:
        raise BidirError(f"{target}: cannot write there ({e.strerror or e})") from None


def make_temp_folder(target: Path, kind: str = "tmp") -> Path:
    """A new empty folder beside target named .<target>.<kind>-<host>-<pid>-XXXXXXXX (host: name and pid namespace):
    the host and pid say who is writing it, so remove_stale_temps can tell a dead writer's leftovers from a live one's work."""
    prefix = f".{target.name}.{kind}-{_host()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Delete what killed writers of target left beside it; returns the folders removed.

    A folder named by make_temp_folder is stale when its writer is gone: same host and its pid is no longer
    running (a live pid, even a reused one, is kept; a folder from another host or pid namespace is kept, as its
    pid cannot be checked from here). Without host and pid in the name (older versions), a folder is stale after
    UNOWNED_STALE_SECONDS without a change. A moved-aside old artifact (.old-) is removed only when target exists:
    otherwise the publish was interrupted between its two renames and the old folder is the only complete copy.
    """
    target = Path(target).expanduser().absolute()
    if not target.parent.is_dir():
        return []
    owned = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(.+)-(\d+)-[a-z0-9_]{{8}}")
    unowned = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    removed = []
    for path in target.parent.iterdir():
        if not path.is_dir() or path.is_symlink():
            continue
        if match := owned.fullmatch(path.name):
            kind, host, pid = match.group(1), match.group(2), int(match.group(3))
            stale = host == _host() and not _running(pid)
        elif match := unowned.fullmatch(path.name):
            kind, stale = match.group(1), _unchanged_for(path, UNOWNED_STALE_SECONDS)
        else:
            continue
        if stale and (kind == "tmp" or target.exists()):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def publish_folder(tmp: Path, target: Path) -> None:
    """Rename the finished folder tmp to target. A non-empty target is first moved aside, so at every moment target
    is either the complete old or the complete new folder; the old one is deleted last. Every file in tmp is
    fsynced before the rename and the parent folder after it, so after a power loss target is the old or the
    complete new folder too. Raises OSError (with the old folder back in place) when the rename fails, e.g.
    because another process published to target first."""
    _fsync_tree(tmp)
    old = None
    if target.is_dir() and any(target.iterdir()):
        old = make_temp_folder(target, "old")
        os.replace(target, old)
    try:
        os.replace(tmp, target)  # replaces an empty folder; fails on a non-empty one
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename or new entry in folder durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; nothing more can be done there
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush path's data to the disk: call it before the rename that publishes the file."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root, name))
        fsync_dir(Path(root))


def _host() -> str:
    """The host name (only characters that cannot be confused with the name's separators), plus the pid namespace
    where Linux has one: two containers may share a host name and a folder, and a pid means nothing across them."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
    try:
        return f"{host}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # another user's process (or an odd pid): assume alive
        return True
    return True


def _unchanged_for(folder: Path, seconds: float) -> bool:
    newest = folder.stat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            with contextlib.suppress(OSError):  # removed meanwhile
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
    return time.time() - newest > seconds
