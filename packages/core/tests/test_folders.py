"""bidir_core.folders and jsonfile: stale temporary folders of killed writers are removed (and nothing else), a
publish killed between its two renames is finished or undone by the next write, and what is published is fsynced
first and gets the permissions a plain write would have."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from bidir_core.embeddings_artifact import write_shard
from bidir_core.errors import BidirError
from bidir_core.folders import (
    UNOWNED_STALE_SECONDS,
    make_temp_folder,
    publish_folder,
    remove_stale_temps,
    start_writing,
)
from bidir_core.jsonfile import write_json_atomic, write_jsonl_atomic
from bidir_core.sources import resolve_source
from bidir_core.testing import tiny_encoder


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def _as_if_written_by(folder, pid):
    return folder.rename(folder.with_name(folder.name.replace(f"-{os.getpid()}-", f"-{pid}-")))


def _age(folder, seconds):
    then = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then))


def test_only_a_dead_writers_temp_folders_are_removed(tmp_path, dead_pid):
    # Regression: a killed write left .<target>.tmp-*/ (gigabytes of weights) beside the target, forever.
    target = tmp_path / "model"
    killed = _as_if_written_by(make_temp_folder(target), dead_pid)
    (killed / "model.safetensors").write_bytes(b"\0" * 1024)
    live = make_temp_folder(target)  # this process: a writer at work
    other_host = tmp_path / f".model.tmp-otherhost-{dead_pid}-abcdefgh"  # its pid cannot be checked from here
    other_host.mkdir()
    other_target = _as_if_written_by(make_temp_folder(tmp_path / "model2"), dead_pid)
    lookalike = tmp_path / ".model.tmp-mine"  # not our pattern
    lookalike.mkdir()
    assert remove_stale_temps(target) == [killed]
    assert not killed.exists()
    assert live.is_dir() and other_host.is_dir() and other_target.is_dir() and lookalike.is_dir()


def test_folders_from_older_versions_are_removed_once_unchanged_for_a_day(tmp_path):
    target = tmp_path / "out.onnx"
    old = tmp_path / ".out.onnx.tmp-k2j4_x9q"  # mkdtemp's name, as bidir wrote it before
    old.mkdir()
    (old / "model.onnx").write_bytes(b"half")
    recent = tmp_path / ".out.onnx.tmp-abcdefgh"
    recent.mkdir()
    _age(old, UNOWNED_STALE_SECONDS + 60)
    assert remove_stale_temps(target) == [old]
    assert recent.is_dir()


def test_a_moved_aside_old_folder_is_kept_while_it_is_the_only_copy(tmp_path, dead_pid):
    # Killed between publish_folder's two renames: target is gone, .old- holds the complete previous artifact.
    target = tmp_path / "ckpt"
    olds = [_as_if_written_by(make_temp_folder(target, "old"), dead_pid) for _ in range(2)]
    for old in olds:
        (old / "bidir.json").write_text("{}")
    assert remove_stale_temps(target) == []  # two: which one is newest is a guess, so neither is put back
    assert all(old.is_dir() for old in olds)
    shutil.rmtree(olds[1])
    with pytest.warns(UserWarning, match="killed while replacing it was undone"):
        assert remove_stale_temps(target) == []
    assert (target / "bidir.json").is_file() and not olds[0].exists()  # the only copy, put back
    old = _as_if_written_by(make_temp_folder(target, "old"), dead_pid)
    assert remove_stale_temps(target) == [old]


def test_publish_and_json_writers_fsync(tmp_path, monkeypatch):
    # Regression: nothing was fsynced before the rename that publishes a manifest or a checkpoint.
    synced = []
    real = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_jsonl_atomic(tmp_path / "b.jsonl", [{"x": 1}])
    tmp = make_temp_folder(tmp_path / "folder")
    (tmp / "weights.bin").write_bytes(b"\1")
    publish_folder(tmp, tmp_path / "folder")
    if not os.path.exists("/proc/self/fd"):
        assert len(synced) >= 6
        return
    names = [os.path.basename(p) for p in synced]
    assert any(n.startswith(".a.json.") for n in names) and any(n.startswith(".b.jsonl.") for n in names)
    assert any(n == "weights.bin" for n in names)  # the file, before the rename
    assert str(tmp_path) in synced  # the folder holding the renamed entries, after it


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    """The process umask set to the parameter for the test, and the previous one restored after it."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _modes(root):
    """{path relative to root: permission bits} of root and everything under it."""
    return {
        path.relative_to(root).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in [root, *root.rglob("*")]
    }


def test_published_files_get_the_modes_a_plain_write_has(tmp_path, umask):
    # Regression: checkpoint folders were 0700 (mkdtemp), model.safetensors and every manifest 0600 (mkstemp and
    # safetensors' own temp file), so a model store or embeddings folder shared with another user was unreadable.
    folder_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    ckpt = tiny_encoder().save_pretrained(tmp_path / "ckpt")
    emb = tmp_path / "emb"
    write_json_atomic(emb / "manifest.json", {"complete": False})
    write_shard(emb, 0, ["a"], np.zeros((1, 4), dtype=np.float32))
    write_json_atomic(emb / "manifest.json", {"complete": True})  # replaces the file: the new one's mode
    write_jsonl_atomic(tmp_path / "rows.jsonl", [{"x": 1}])
    modes = {
        **{f"ckpt/{k}": v for k, v in _modes(ckpt).items()},
        **{f"emb/{k}": v for k, v in _modes(emb).items()},
    }
    modes["rows.jsonl"] = stat.S_IMODE((tmp_path / "rows.jsonl").stat().st_mode)
    assert modes["ckpt/."] == folder_mode and modes["ckpt/1_Pooling"] == folder_mode
    assert modes["ckpt/model.safetensors"] == file_mode and modes["emb/manifest.json"] == file_mode
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (folder_mode if (tmp_path / name).is_dir() else file_mode)
    }
    assert wrong == {}


def test_publish_gives_every_file_and_folder_the_plain_modes_and_follows_no_link(tmp_path, umask):
    outside = tmp_path / "not-ours.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    target = tmp_path / "export"
    tmp = start_writing(target)
    (tmp / "sub").mkdir(mode=0o700)
    (tmp / "sub" / "weights.bin").write_bytes(b"\1")
    (tmp / "sub" / "weights.bin").chmod(0o600)  # as a writer that makes its files private leaves them
    (tmp / "run.sh").write_text("#!/bin/sh\n")
    (tmp / "run.sh").chmod(0o700)
    (tmp / "link").symlink_to(outside)
    publish_folder(tmp, target)
    folder_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    assert _modes(target) == {
        ".": folder_mode,
        "sub": folder_mode,
        "sub/weights.bin": file_mode,
        "run.sh": folder_mode,  # an executable stays executable, as a plain write of one would be
        "link": 0o600,  # the link's target, which is not ours: unchanged
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no probe left behind


_KILLED_BETWEEN_RENAMES = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from bidir_core.folders import publish_folder, start_writing

    target = Path(sys.argv[1])
    tmp = start_writing(target)
    (tmp / "version").write_text("new")
    renames = []
    real = os.replace

    def replace(src, dst):
        renames.append(src)
        if len(renames) == 2:  # the old version is aside, the new one not yet in place
            os._exit(9)
        real(src, dst)

    os.replace = replace
    publish_folder(tmp, target)
    """
)


def _killed_between_renames(target):
    """target holds version "old"; a process publishing version "new" to it is killed between the two renames."""
    target.mkdir()
    (target / "version").write_text("old")
    before = set(target.parent.iterdir())
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(target)], capture_output=True, text=True
    )
    assert done.returncode == 9, done.stderr
    assert not target.exists()
    hidden = sorted(set(target.parent.iterdir()) - before)
    assert [p.name.split("-")[0] for p in hidden] == [f".{target.name}.old", f".{target.name}.tmp"]
    assert [(p / "version").read_text() for p in hidden] == ["old", "new"]
    return hidden


def _theirs(tmp_path):
    """Things beside a target that are not a bidir writer's own: they must survive every recovery."""
    mine = tmp_path / ".model.old-mine"  # not our pattern
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    other = tmp_path / ".model.old-otherhost-1-abcdefgh"  # another host's: its writer may still be at work
    other.mkdir()
    (tmp_path / "model.txt").write_text("keep")
    return {mine, mine / "notes.txt", other, tmp_path / "model.txt"}


def test_a_publish_killed_between_its_renames_is_finished_by_the_next_write(tmp_path):
    # Regression: the target was gone and both complete copies hidden; the next run removed the new one as stale
    # and never restored the old one.
    target = tmp_path / "model"
    theirs = _theirs(tmp_path)
    old, new = _killed_between_renames(target)
    with pytest.warns(UserWarning, match="killed while replacing it was finished"):
        tmp = start_writing(target)  # the next write to target
    assert (target / "version").read_text() == "new"  # the killed publish, finished
    assert not old.exists() and not new.exists()
    (tmp / "version").write_text("newer")
    publish_folder(tmp, target)
    assert (target / "version").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")) == [
        ".model.old-mine",
        ".model.old-otherhost-1-abcdefgh",
    ]
    assert all(p.exists() for p in theirs)


def test_a_killed_publish_whose_new_copy_is_gone_is_undone(tmp_path):
    target = tmp_path / "model"
    theirs = _theirs(tmp_path)
    old, new = _killed_between_renames(target)
    shutil.rmtree(new)  # as an older bidir's stale-folder cleanup did
    with pytest.warns(UserWarning, match="killed while replacing it was undone"):
        remove_stale_temps(target)  # what a run starts with
    assert (target / "version").read_text() == "old"
    assert not old.exists()
    assert all(p.exists() for p in theirs)


def test_loading_a_target_a_killed_publish_left_hidden_names_the_copy(tmp_path):
    target = tmp_path / "model"
    old, new = _killed_between_renames(target)
    with pytest.raises(BidirError) as e:
        resolve_source(target)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{target}: no such file or folder")
    assert new.name in message and old.name in message and "rename" in message
    assert old.is_dir() and new.is_dir()  # a loader only says what is there


def test_a_checkpoint_write_sees_the_checkpoint_a_killed_publish_left(tmp_path, dead_pid):
    # The recovery runs before write_checkpoint's checks: without overwrite, the recovered checkpoint is refused,
    # not silently replaced.
    encoder = tiny_encoder()
    target = encoder.save_pretrained(tmp_path / "ckpt")
    new = _as_if_written_by(make_temp_folder(target), dead_pid)
    shutil.copytree(target, new, dirs_exist_ok=True)
    target.rename(new.with_name(new.name.replace(".ckpt.tmp-", ".ckpt.old-")))  # the old version, moved aside
    with (
        pytest.warns(UserWarning, match="finished"),
        pytest.raises(BidirError, match="exists and is not empty"),
    ):
        encoder.save_pretrained(target)
    assert (target / "bidir.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
