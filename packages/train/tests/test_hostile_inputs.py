"""A hostile or careless run folder and recipe: nothing executed, nothing NaN, nothing lost, one line naming the
file or key (issue 14: items 2a, 3, 5, 10, 11, 12, 13 on the training side)."""

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
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from train_testing import (
    RESUMABLE,
    assert_same_final,
    loss_curve,
    recipe_args,
    stopped_run,
    torchrun_train,
    train_recipe,
)

from bidir_core.errors import BidirError
from bidir_train import load_recipe


@pytest.fixture(scope="module")
def straight(tiny_args, tmp_path_factory):
    """4 uninterrupted steps: the reference of every resumed run here."""
    out = tmp_path_factory.mktemp("straight")
    train_recipe(tiny_args(out, *RESUMABLE))
    return out


@pytest.fixture
def stopped(tiny_checkpoint, train_jsonl, tmp_path):
    """A run stopped after step 2, checkpoints step-1 and step-2; returns (args to resume it, output_dir)."""
    out = tmp_path / "run"
    args = stopped_run(tiny_checkpoint, train_jsonl, out, 2)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000001", "step-00000002"]
    return args, out


class _Marker:
    """Unpickling this creates the marker file: what a crafted pickle in a shared run folder would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------- 2a: no code execution


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


# ------------------------------------------------------------------------------------------ 3: changed recipe


def test_resume_refuses_another_recipe(stopped, tiny_checkpoint, tmp_path):
    args, out = stopped
    other = tmp_path / "other-model"
    shutil.copytree(tiny_checkpoint, other)
    recipe = (out / "recipe.json").read_bytes()
    changed = [a for a in args if not a.startswith("model.path=")] + [f"model.path={other}", "optim.lr=0.01"]
    with pytest.raises(BidirError) as e:
        train_recipe(changed)
    message = str(e.value)
    assert f"{out / 'recipe.json'}: this run folder holds a run of another recipe" in message
    assert "differs in model.path, optim.lr)" in message and "checkpoint.resume=false" in message
    assert (out / "recipe.json").read_bytes() == recipe  # not overwritten
    assert len(list((out / "checkpoints").iterdir())) == 2

    # Asked to start over: the old run's checkpoints go, the new recipe is recorded, the run starts at step 1.
    summary = train_recipe([*changed, "checkpoint.resume=false", "schedule.stop_at_step=1"])
    assert summary["steps"] == 1
    assert json.loads((out / "recipe.json").read_text())["optim"]["lr"] == 0.01
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1]


def test_resume_allows_keys_that_do_not_change_the_result(stopped, straight):
    args, out = stopped
    recipe = (out / "recipe.json").read_bytes()
    train_recipe([*args, "checkpoint.keep=1", "logging.every_steps=1", "schedule.forward_chunk_size=1"])
    assert loss_curve(out) == pytest.approx(loss_curve(straight), abs=1e-6)
    assert (out / "recipe.json").read_bytes() == recipe  # the recipe the run started with


# --------------------------------------------------------------------------------------- 5, 12: bad numbers


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.temperature=.nan", "loss.temperature must be a finite number, got nan"),
        ("optim.lr=.nan", "optim.lr must be a finite number"),
        ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
        ("optim.lr=.inf", "optim.lr must be a finite number"),
        ("optim.betas=[0.9, .nan]", "optim.betas must be a finite number"),
        ("optim.betas=[0.9, 1.5]", "optim.betas must be in [0, 1)"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm must be > 0 or null"),
    ],
)
def test_non_finite_or_out_of_range_config_value(override, message):
    with pytest.raises(BidirError) as e:
        load_recipe("tiny", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_diverging_run_stops_before_nan_weights(tiny_args, tmp_path):
    from bidir_train.checkpoints import SafeReader

    out = tmp_path / "run"
    with pytest.raises(BidirError, match=r"^step \d: the loss is (nan|inf)") as e:
        train_recipe(tiny_args(out, *RESUMABLE, "optim.lr=1e30", "schedule.warmup_steps=0"))
    assert "\n" not in str(e.value)
    assert not (out / "final").exists()
    assert list((out / "checkpoints").iterdir())
    for ckpt in (out / "checkpoints").iterdir():  # its tensors, read without a model: every one finite
        state: dict = {}
        _load_state_dict(
            state, storage_reader=SafeReader(ckpt), planner=_EmptyStateDictLoadPlanner(), no_dist=True
        )
        tensors = [v for v in state["model"].values() if isinstance(v, torch.Tensor)]
        assert tensors and all(torch.isfinite(t).all() for t in tensors), ckpt


# --------------------------------------------------------------------------------- 10: damaged resume state


def test_torn_last_metrics_line_is_dropped(stopped, straight):
    args, out = stopped
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "epoch": 0, "lo')  # killed mid-write
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_recipe(args)
    assert any("metrics.jsonl:3: dropped a torn last line" in str(w.message) for w in caught)
    assert loss_curve(out) == loss_curve(straight)


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


# -------------------------------------------------------------------- 11, 12, 13: the run folder itself


def test_stale_temp_folders_are_removed_and_checkpoints_fsynced(tiny_args, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    # a writer of final/ that died: bidir_core.folders' temp naming, made by a process that has exited
    made = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from bidir_core.folders import make_temp_folder;"
         " t = make_temp_folder(Path(sys.argv[1])); (t / 'model.safetensors').write_bytes(b'x' * 1000)",
         str(out / "final")],
        check=True,
    )  # fmt: skip
    assert made.returncode == 0 and len(list(out.glob(".final.tmp-*"))) == 1
    (out / "checkpoints" / "step-00000009.tmp").mkdir(parents=True)
    (out / ".not-ours").mkdir()
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))
    )
    train_recipe(tiny_args(out, *RESUMABLE, "schedule.max_steps=2"))
    assert sorted(p.name for p in out.iterdir()) == [
        ".not-ours",
        "checkpoints",
        "final",
        "inputs.json",
        "metrics.jsonl",
        "recipe.json",
    ]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    assert str(out / "checkpoints") in synced  # the rename that published the checkpoint
    assert str(out / "checkpoints" / "step-00000001.tmp") in synced  # its folder, before the rename
    assert str(out / "checkpoints" / "step-00000001.tmp" / "trainer_state.json") in synced


def test_unwritable_output_dir_is_found_before_the_model_loads(train_jsonl, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(
        BidirError, match=r"a-file/run/recipe.json: cannot be written \(.*a-file is not a folder\)"
    ):
        train_recipe(
            recipe_args(tmp_path / "no-such-model", train_jsonl, blocker / "run", *RESUMABLE)
        )  # the model is never looked at


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


def test_a_config_error_leaves_nothing_behind(tiny_args, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(BidirError):
        train_recipe(tiny_args(out, *RESUMABLE, "loss.matryoshka_dims=[9999]"))
    assert not out.exists()


def test_recipe_differences_lists_dotted_keys():
    from bidir_train.run_folder import recipe_differences

    old = {
        "name": "a",
        "optim": {"lr": 1.0},
        "logging": {"every_steps": 1},
        "eval": {"dev": "x", "batch_size": 2},
    }
    new = {
        "name": "b",
        "optim": {"lr": 2.0},
        "logging": {"every_steps": 5},
        "eval": {"dev": "y", "batch_size": 4},
    }
    assert recipe_differences(old, new) == ["eval.dev", "optim.lr"]
    assert recipe_differences(old, {**old, "mntp": {"max_length": 3}}) == ["mntp.max_length"]


def test_a_field_added_since_the_run_started_resumes_at_its_default():
    # recipe.json of a run started before loss.cosent_scale and lora existed: resuming with them at their defaults
    # is the same recipe; with one changed, it is not.
    from bidir_train.config import TrainConfig
    from bidir_train.run_folder import recipe_differences, recipe_json

    defaults = recipe_json(TrainConfig())
    old = recipe_json(TrainConfig())
    del old["lora"], old["loss"]["cosent_scale"]
    assert recipe_differences(old, defaults, defaults=defaults) == []
    assert recipe_differences(old, defaults) == ["lora", "loss.cosent_scale"]
    changed = {**defaults, "loss": {**defaults["loss"], "cosent_scale": 5.0}}
    assert recipe_differences(old, changed, defaults=defaults) == ["loss.cosent_scale"]
    # An optional section set in both (lora: a subtree) is not "missing" because the default is null.
    with_lora = {**defaults, "lora": {"rank": 4, "alpha": 8}}
    assert recipe_differences(with_lora, with_lora, defaults=defaults) == []
    assert recipe_differences(defaults, with_lora, defaults=defaults) == ["lora", "lora.alpha", "lora.rank"]


def test_disk_full_while_writing_the_final_model(tiny_args, tmp_path, monkeypatch):
    import bidir_core.checkpoint

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(bidir_core.checkpoint, "save_file", full)
    out = tmp_path / "run"
    with pytest.raises(BidirError) as e:
        train_recipe(tiny_args(out, *RESUMABLE, "schedule.max_steps=1"))
    # bidir_core.checkpoint names what was not written (final/) and why, in one line
    assert str(e.value) == f"{out / 'final'}: not written: No space left on device"
    assert not (out / "final").exists() and not list(out.glob(".final.*"))


def test_two_ranks_fall_back_together(tiny_args, tmp_path):
    """Rank 1's shard of the newest checkpoint is truncated: both ranks skip it and resume from the one before."""
    args = tiny_args(tmp_path / "run", *RESUMABLE, "schedule.micro_batch_size=1")
    torchrun_train(2, [*args, "schedule.stop_at_step=2"])
    shard = tmp_path / "run" / "checkpoints" / "step-00000002" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    proc = torchrun_train(2, args)
    assert f"resuming from step-00000001: skipped the damaged {shard}: truncated" in proc.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
