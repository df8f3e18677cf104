"""Writing files as a plain write would, durably: the permissions a plain open() / mkdir() would give (a published
model or embeddings folder is read by other users), temporary files renamed into place, and fsync before the rename
that publishes a file or a folder (folders.publish_folder, jsonfile's atomic writes, the embeddings shards).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def set_plain_modes(path: Path) -> None:
    """Give path (a file, or a folder and everything under it) the permissions a plain open() or mkdir() would
    give it where it is: what mkstemp and mkdtemp make is private (0600, 0700), and so is what some writers (e.g.
    safetensors' save_file) leave, but a published model or embeddings folder must be readable by whoever the
    user's umask lets read it. A file with an execute bit gets the folder mode. Symbolic links are skipped (chmod
    would change what they point at, which is not ours). Only for what this process wrote, before publishing it."""
    path = Path(path)
    folder = path if path.is_dir() and not path.is_symlink() else path.parent
    file_mode, folder_mode = _plain_modes(folder)

    def fix(p: str | Path, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            return
        if stat.S_ISDIR(st.st_mode):
            mode = folder_mode  # with the setgid bit where a plain mkdir there inherits it
        else:
            mode = folder_mode & 0o777 if st.st_mode & 0o111 else file_mode
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(p, mode)

    fix(path, os.lstat(path))
    if folder is not path:
        return
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            fix(p, os.lstat(p))


def _plain_modes(folder: Path) -> tuple[int, int]:
    """(file mode, folder mode) that open(..., 0o666) and mkdir(..., 0o777) give in folder, read off a probe file
    and folder made there and removed at once.

    The umask cannot be read without setting it (os.umask), and setting and restoring it is racy: another thread
    creating a file in between gets the wrong mode. /proc/self/status has it on Linux only, and a default ACL on
    the folder overrides the umask for what is created there. A probe is created by the kernel under exactly the
    rules a plain write follows, on every platform. The probes go in folder, which holds what this process is about
    to publish: a probe a kill leaves there is never published, as the publish never happens."""
    probe = folder / f".mode-probe-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        file_mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)
    os.mkdir(probe, 0o777)
    try:
        folder_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)
    return file_mode, folder_mode


def create_temp_file(path: Path) -> tuple[int, Path]:
    """(fd open for writing, its path) of a new empty file .<path name>.XXXXXXXX.tmp beside path, to be renamed to
    path when written. Unlike mkstemp's (0600), its permissions are what a plain open() of path would give, so
    the renamed file is readable as any other file the user writes."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


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


def fsync_tree(folder: Path) -> None:
    """fsync every file under folder and every folder in it (before the rename that publishes it)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root, name))
        fsync_dir(Path(root))
