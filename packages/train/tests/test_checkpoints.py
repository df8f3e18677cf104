"""bidir_train.checkpoints: a checkpoint holds no pickle and none is unpickled from it; a damaged newest checkpoint
is skipped for the one before (on every rank together); a checkpoint that cannot be written or read is one line
naming the file, and the earlier ones are kept."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from train_testing import RESUMABLE, assert_same_final, loss_curve, torchrun_train, train_recipe

from bidir_core.errors import BidirError


class _Marker:
    """Unpickling this creates the marker file: what a crafted pickle in a shared run folder would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_dcp_metadata_is_not_unpickled(stopped, tmp_path):
    args, out = stopped
    marker = tmp_path / "pwned"
    for step in ("step-00000001", "step-00000002"):
        (out / "checkpoints" / step / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(BidirError) as e:
        train_recipe(args)
    assert not marker.exists()
    message = str(e.value)
    assert "\n" not in message
    assert f"{out / 'checkpoints' / 'step-00000002' / '.metadata'}: refused" in message
    assert "open, which DCP metadata never holds" in message and "checkpoint.resume=false" in message


def test_crafted_value_in_distcp_is_not_unpickled(tmp_path):
    """DCP's default planner reads non-tensor values with torch.load(weights_only=False); ours does not."""
    from bidir_train.checkpoints import SafeLoadPlanner, SafeReader

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        marker = tmp_path / "pwned"
        dcp.save({"x": torch.zeros(2), "lr": _Marker(marker)}, checkpoint_id=tmp_path / "ckpt")
        with pytest.raises(CheckpointException) as e:
            dcp.load(
                {"x": torch.zeros(2), "lr": None},
                checkpoint_id=tmp_path / "ckpt",
                storage_reader=SafeReader(tmp_path / "ckpt"),
                planner=SafeLoadPlanner(),
            )
        assert not marker.exists()
        assert "a value of lr refused" in str(next(iter(e.value.failures.values()))[0])
    finally:
        if created:
            dist.destroy_process_group()


def test_trainer_and_rng_state_hold_no_pickle(stopped):
    _, out = stopped
    ckpt = out / "checkpoints" / "step-00000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["step_in_epoch"]) == (2, 2)
    assert load_file(ckpt / "rng-rank0.safetensors")["torch"].dtype == torch.uint8
    assert not list(ckpt.glob("*.pt"))


def test_truncated_distcp_falls_back_to_the_previous_checkpoint(stopped, straight):
    args, out = stopped
    shard = out / "checkpoints" / "step-00000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train_recipe(args)
    assert summary["steps"] == 4
    shown = [str(w.message) for w in caught if "resuming from step-00000001" in str(w.message)]
    assert shown and f"{shard}: truncated" in shown[0]
    assert loss_curve(out) == loss_curve(straight)  # resumed from step 1 exactly
    assert_same_final(straight, out)


def test_two_ranks_fall_back_together(tiny_args, tmp_path):
    """Rank 1's shard of the newest checkpoint is truncated: both ranks skip it and resume from the one before."""
    args = tiny_args(tmp_path / "run", *RESUMABLE, "schedule.micro_batch_size=1")
    torchrun_train(2, [*args, "schedule.stop_at_step=2"])
    shard = tmp_path / "run" / "checkpoints" / "step-00000002" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    proc = torchrun_train(2, args)
    assert f"resuming from step-00000001: skipped the damaged {shard}: truncated" in proc.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_empty_trainer_state_names_the_file(stopped):
    """CLI: exit status 2, one line naming the file and the way out, no traceback."""
    args, out = stopped
    shutil.rmtree(out / "checkpoints" / "step-00000001")
    (out / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "bidir_train", "--config", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("bidir_train: error:")]
    assert f"{out / 'checkpoints' / 'step-00000002' / 'trainer_state.json'}: not valid JSON" in line
    assert "checkpoint.resume=false" in line


def test_disk_full_while_saving_a_checkpoint(stopped, monkeypatch):
    args, out = stopped
    from torch.distributed.checkpoint.filesystem import FileSystem

    create_stream = FileSystem.create_stream

    def full(self, path, mode):
        if "w" in mode and str(path).endswith(".distcp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return create_stream(self, path, mode)

    monkeypatch.setattr(FileSystem, "create_stream", full)
    with pytest.raises(BidirError) as e:
        train_recipe(args)
    message = str(e.value)
    assert "\n" not in message
    assert f"{out / 'checkpoints' / 'step-00000003.tmp'}" in message and "No space left on device" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
