"""bidir_core.folders and jsonfile: stale temporary folders of killed writers are removed (and nothing else), and
what is published is fsynced first."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bidir_core.folders import UNOWNED_STALE_SECONDS, make_temp_folder, publish_folder, remove_stale_temps
from bidir_core.jsonfile import write_json_atomic, write_jsonl_atomic


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
    # Issue 14.11: a killed write left .<target>.tmp-*/ (gigabytes of weights) beside the target, forever.
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
    old = _as_if_written_by(make_temp_folder(target, "old"), dead_pid)
    (old / "bidir.json").write_text("{}")
    assert remove_stale_temps(target) == []
    target.mkdir()
    assert remove_stale_temps(target) == [old]


def test_publish_and_json_writers_fsync(tmp_path, monkeypatch):
    # Issue 14.13: nothing was fsynced before the rename that publishes a manifest or a checkpoint.
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
