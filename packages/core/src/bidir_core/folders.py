"""Artifact folders that appear complete or not at all: built under a temporary name next to the target, then
renamed into place (checkpoints here, exports and engines in bidir-export, training's final/ in bidir-train).

    tmp = start_writing(target)         # stale temps removed, then .<target>.tmp-<host>-<pid>-XXXXXXXX beside it
    ... write into tmp ...
    publish_folder(tmp, target)         # plain modes, fsynced, then renamed into place

remove_stale_temps(target) deletes the temporary folders a killed writer left beside target (they can hold
gigabytes of weights), after finishing or undoing a publish that was killed between its two renames
(finish_interrupted_publish); start_writing calls it before it makes the new one. Only names of exactly this
pattern are touched.

What is published gets the permissions a plain write would have (file_writes.set_plain_modes, create_temp_file), not the
private ones of a temporary file or folder: a model store or embeddings folder may be read by another user.
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
import warnings
from pathlib import Path

from bidir_core.errors import BidirError
from bidir_core.file_writes import fsync_dir, fsync_tree, set_plain_modes

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
    UNOWNED_STALE_SECONDS without a change. A publish killed between its two renames is finished or undone first
    (finish_interrupted_publish); a moved-aside old artifact (.old-) that is still there is removed only when
    target exists, as otherwise it may be the only complete copy.
    """
    target = Path(target).expanduser().absolute()
    if not target.parent.is_dir():
        return []
    finish_interrupted_publish(target)
    removed = []
    for path, kind, stale in _temps(target):
        if stale and (kind != "old" or target.exists()):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _temps(target: Path) -> list[tuple[Path, str, bool]]:
    """(folder, kind, stale) of the temporary folders of target's writers beside it: kind tmp (being written), old
    (the previous version, moved aside by publish_folder) or del (being deleted); stale when its writer is gone."""
    if not target.parent.is_dir():
        return []
    owned = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old|del)-(.+)-(\d+)-[a-z0-9_]{{8}}")
    unowned = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    found = []
    for path in sorted(target.parent.iterdir()):
        if not path.is_dir() or path.is_symlink():
            continue
        if match := owned.fullmatch(path.name):
            kind, host, pid = match.group(1), match.group(2), int(match.group(3))
            found.append((path, kind, host == _host() and not _running(pid)))
        elif match := unowned.fullmatch(path.name):
            found.append((path, match.group(1), _unchanged_for(path, UNOWNED_STALE_SECONDS)))
    return found


def finish_interrupted_publish(target: str | Path) -> Path | None:
    """Complete what a publish_folder killed between its two renames left: target missing, the previous version
    moved aside (.old-) and the new one complete under its temporary name (.tmp-, same suffix). The new one is
    renamed into place and the old one deleted, as the publish would have done; when the new one is gone, the old
    one is put back. Returns the folder now at target (None when there was nothing to do, e.g. target exists or
    the writer may still be at work). Only a dead writer's folders on this host are touched, and only when there
    is exactly one such publish, so it is never a guess; a warning names what was done."""
    target = Path(target).expanduser().absolute()
    try:
        old = None if os.path.lexists(target) else _recoverable(target)
    except OSError:  # target's folder cannot be listed: nothing can be recovered, and the write says why
        return None
    if old is None:
        return None
    new = _paired(old, target, "tmp")
    finish = new.is_dir()
    try:
        os.replace(new if finish else old, target)
    except (
        OSError
    ):  # another process recovered it first (target is there now), or it cannot be done from here
        return None
    fsync_dir(target.parent)
    if finish:
        _delete(old, target)
        what = f"finished: the new version {new.name} is now {target.name}, the previous one deleted"
    else:
        what = f"undone: the new version was gone, so the previous one ({old.name}) is back"
    warnings.warn(f"{target}: a write killed while replacing it was {what}", stacklevel=2)
    return target


def interrupted_publish_hint(target: str | Path) -> str:
    """For a loader's "no such file" error: where the copies of target that a publish_folder interrupted between
    its two renames left are, and what to do ("" when there are none or target exists)."""
    target = Path(target).expanduser().absolute()
    try:
        temps = [] if os.path.lexists(target) else _temps(target)
    except OSError:  # target's folder cannot be listed: the loader's own error stands alone
        return ""
    recoverable = _recoverable(target) if temps else None
    found = []
    for old, kind, stale in temps:
        if kind != "old":
            continue
        new = _paired(old, target, "tmp")
        if new is not None and new.is_dir():
            left, copy = f"the complete new version in {new.name} and the previous one in {old.name}", new
            next_write = "puts the new version in place"
        else:
            left, copy, next_write = f"the previous version in {old.name}", old, "puts it back"
        if old == recoverable:
            found.append(
                f"{left}: the next write to {target.name} {next_write}, or rename {copy.name} to {target.name}"
            )
        elif stale:
            found.append(f"{left}: rename {copy.name} to {target.name}")
        else:
            found.append(
                f"{left}, but its writer may still be running (or ran on another host): once it is gone, "
                f"rename {copy.name} to {target.name}"
            )
    return (
        f"; a write killed while replacing it left, in {target.parent}, {'; '.join(found)}" if found else ""
    )


def _recoverable(target: Path) -> Path | None:
    """The moved-aside old version of the one publish to target that a dead writer on this host left between its
    two renames, or None when there is none or more than one (then which is newest is a guess)."""
    olds = [path for path, kind, stale in _temps(target) if kind == "old" and stale and _paired(path, target)]
    return olds[0] if len(olds) == 1 else None


def _paired(folder: Path, target: Path, kind: str = "old") -> Path | None:
    """The folder of the same publish as folder with the given kind (.tmp- <-> .old-: one suffix), or None when
    folder's name is not one publish_folder pairs."""
    match = re.fullmatch(rf"\.{re.escape(target.name)}\.(tmp|old)-(.+-\d+-[a-z0-9_]{{8}})", folder.name)
    return folder.with_name(f".{target.name}.{kind}-{match.group(2)}") if match else None


def publish_folder(tmp: Path, target: Path) -> None:
    """Rename the finished folder tmp to target. Everything in tmp first gets the permissions a plain write would
    have (set_plain_modes). A non-empty target is first moved aside, so at every moment target is either the
    complete old or the complete new folder; the old one is deleted last. Killed between the two renames, the old
    one is .<target>.old-SUFFIX and the new one .<target>.tmp-SUFFIX, and the next write puts the new one in place
    (finish_interrupted_publish). Every file in tmp is fsynced before the rename and the parent folder after it,
    so after a power loss target is the old or the complete new folder too. Raises OSError (with the old folder
    back in place) when the rename fails, e.g. because another process published to target first."""
    set_plain_modes(tmp)
    fsync_tree(tmp)
    old = None
    if target.is_dir() and any(target.iterdir()):
        old = _aside(tmp, target)
        os.replace(target, old)
    try:
        os.replace(tmp, target)  # replaces an empty folder; fails on a non-empty one
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        _delete(old, target)


def _aside(tmp: Path, target: Path) -> Path:
    """The empty folder target is moved onto: named after tmp (.old- for .tmp-, same suffix) when tmp is this
    process's own, so finish_interrupted_publish knows which new version belongs to which old one."""
    paired = _paired(tmp, target)
    mine = f".{target.name}.old-{_host()}-{os.getpid()}-"
    if paired is not None and paired.name.startswith(mine) and tmp.parent == target.parent:
        with contextlib.suppress(FileExistsError):
            paired.mkdir()
            return paired
    return make_temp_folder(target, "old")


def _delete(old: Path, target: Path) -> None:
    """Delete a replaced version. It is renamed first (.del-), so a folder still named .old- is always complete:
    one a killed deletion left is stale garbage, never a copy to put back."""
    doomed = old
    with contextlib.suppress(OSError):  # not renamed: deleted under its own name, as before
        doomed = make_temp_folder(target, "del")
        os.replace(old, doomed)
    if doomed != old and old.is_dir():  # the rename failed: the empty folder made for it goes too
        doomed.rmdir()
        doomed = old
    shutil.rmtree(doomed, ignore_errors=True)


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
