"""bidir_train.run_folder: a run folder resumes only the recipe it holds (keys that do not change the result aside),
drops a torn last metrics line, removes stale temporary folders, and is checked for writing before the model loads;
a config error leaves no folder behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from train_testing import RESUMABLE, loss_curve, recipe_args, train_recipe

from bidir_core.errors import BidirError


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


def test_torn_last_metrics_line_is_dropped(stopped, straight):
    args, out = stopped
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "epoch": 0, "lo')  # killed mid-write
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_recipe(args)
    assert any("metrics.jsonl:3: dropped a torn last line" in str(w.message) for w in caught)
    assert loss_curve(out) == loss_curve(straight)


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


def test_a_config_error_leaves_nothing_behind(tiny_args, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(BidirError):
        train_recipe(tiny_args(out, *RESUMABLE, "loss.matryoshka_dims=[9999]"))
    assert not out.exists()
