"""What a run started from (inputs.json: the model's files and the training data's bytes) is checked on resume: a
base replaced under the same model.path (LoRA would merge adapters trained on the old one) or data.train rewritten
under the same name is refused with one line naming it, unless the run is started over."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from train_testing import RESUMABLE, loss_curve, recipe_args, stopped_run, train_recipe

from bidir_core.errors import BidirError
from bidir_core.testing import tiny_encoder
from bidir_train import load_recipe
from bidir_train.run_inputs import INPUTS, input_identity


@pytest.fixture
def inputs(tiny_checkpoint, train_jsonl, tmp_path):
    """Copies of the model and the data that a test may replace: (model folder, data file)."""
    model, data = tmp_path / "model", tmp_path / "train.jsonl"
    shutil.copytree(tiny_checkpoint, model)
    shutil.copy(train_jsonl, data)
    return model, data


def _refused(args, out, *names) -> str:
    recorded = (out / INPUTS).read_bytes()
    with pytest.raises(BidirError) as e:
        train_recipe(args)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{out / INPUTS}: ")
    assert all(name in message for name in names) and "checkpoint.resume=false" in message
    assert (out / INPUTS).read_bytes() == recorded  # nothing rewritten
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000001"]
    return message


def test_lora_resume_refuses_a_replaced_base(inputs, tmp_path):
    model, data = inputs
    out = tmp_path / "run"
    args = stopped_run(model, data, out, 1, "lora.rank=4")
    # Another base of the same architecture (same file names, sizes and safetensors header) at the same path.
    shutil.rmtree(model)
    tiny_encoder(seed=1).save_pretrained(model)
    message = _refused(args, out, f"model.path ({model})", "model.safetensors: other contents")
    assert "data.train" not in message
    # Asked to start over: trains from step 1 on the new base and records it.
    summary = train_recipe([*args, "checkpoint.resume=false", "schedule.stop_at_step=1"])
    assert summary["steps"] == 1
    train_recipe(args)  # and now resumes
    assert (out / "final").is_dir()


def test_resume_refuses_training_data_rewritten_in_place(inputs, tmp_path):
    model, data = inputs
    out = tmp_path / "run"
    args = stopped_run(model, data, out, 1)
    text = data.read_text()
    stat = data.stat()
    data.write_text(text.replace("item 7", "item 8"))  # same length: only the bytes differ
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    assert data.stat().st_size == stat.st_size
    _refused(args, out, f"data.train ({data})", "train.jsonl: other contents")
    # Put back as it was: resumes.
    data.write_text(text)
    train_recipe(args)
    assert (out / "final").is_dir()


def test_an_unchanged_copy_or_a_touched_file_resumes(inputs, tmp_path):
    """The identity is of contents, not of modification times: a plain copy of the same model resumes."""
    model, data = inputs
    out = tmp_path / "run"
    args = stopped_run(model, data, out, 2)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)  # new modification times
    shutil.rmtree(model)
    copy.rename(model)
    data.touch()
    train_recipe(args)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [
        1,
        2,
        3,
        4,
    ]


def test_a_run_folder_from_before_the_record_resumes_and_gets_one(inputs, tmp_path):
    model, data = inputs
    out, whole = tmp_path / "run", tmp_path / "whole"
    train_recipe(recipe_args(model, data, whole, *RESUMABLE))
    args = stopped_run(model, data, out, 2)
    (out / INPUTS).unlink()  # a run folder written before inputs.json existed
    train_recipe(args)
    assert loss_curve(out) == loss_curve(whole)
    assert json.loads((out / INPUTS).read_text()) == json.loads((whole / INPUTS).read_text())


def test_identity_names_the_files_and_reads_a_few_windows_of_the_weights(inputs):
    model, data = inputs
    identity = input_identity(load_recipe("tiny", [f"model.path={model}", f"data.train={data}"]))
    files = identity["model.path"]["files"]
    assert {"config.json", "bidir.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert files["model.safetensors"]["size"] == (model / "model.safetensors").stat().st_size
    assert identity["data.train"]["files"]["train.jsonl"]["size"] == data.stat().st_size
    builtin = input_identity(load_recipe("tiny", [f"model.path={model}", "data.train=stdlib-docstrings"]))
    assert builtin["data.train"] == {"builtin": "stdlib-docstrings"}


def test_a_large_weight_file_is_known_by_its_size_and_three_windows(tmp_path, monkeypatch):
    from bidir_train import run_inputs

    monkeypatch.setattr(run_inputs, "WINDOW", 4)  # a 100-byte file is "large": windows at 0, 48 and 96
    weights = tmp_path / "model.safetensors"
    original = bytes(range(100))
    weights.write_bytes(original)
    before = run_inputs._file_identity(weights)
    assert set(before) == {"size", "sampled_sha256"}
    for offset in (0, 49, 99):  # a byte in each window: another identity
        changed = bytearray(original)
        changed[offset] ^= 1
        weights.write_bytes(changed)
        assert run_inputs._file_identity(weights) != before, offset
    weights.write_bytes(original + b"\0")
    assert run_inputs._file_identity(weights)["size"] == 101
    data = tmp_path / "train.jsonl"  # data is read whole, however large
    data.write_bytes(original)
    assert set(run_inputs._file_identity(data, whole=True)) == {"size", "sha256"}
