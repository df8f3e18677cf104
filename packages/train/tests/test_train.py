"""bidir_train's trainer end to end on a tiny random model: FSDP parity across world sizes, exact resume, the final
checkpoint, GradCache inside the loop, a diverging run stopped before NaN weights, and one-line errors for bad input
and a full disk."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from train_testing import RESUMABLE, assert_same_final, loss_curve, recipe_args, torchrun_train, train_recipe

from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_train import load_recipe


@pytest.fixture(scope="module")
def straight(tiny_args, tmp_path_factory):
    """The reference: 6 steps on one process (global batch 4 = 2 micro-batches of 2)."""
    out = tmp_path_factory.mktemp("straight")
    summary = train_recipe(tiny_args(out))
    assert summary["steps"] == 6
    return out


def test_two_ranks_match_one(tiny_args, straight, tmp_path):
    """FSDP2 over 2 gloo ranks, micro-batch 1 per rank, same global batch and groups: same losses (fp32). Both
    pack their forwards (schedule.packing auto: packed on CPU)."""
    torchrun_train(2, tiny_args(tmp_path, "schedule.micro_batch_size=1"))
    one, two = loss_curve(straight), loss_curve(tmp_path)
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, abs=1e-5)
    assert one[0] != pytest.approx(one[-1], abs=1e-3)  # the model did learn something
    assert_same_final(straight, tmp_path, atol=1e-5)


def test_resume_is_exact(tiny_args, straight, tmp_path):
    """3 steps, stop, rerun -> resumes from the step-3 checkpoint: identical losses and final weights."""
    args = tiny_args(tmp_path)
    first = train_recipe([*args, "schedule.stop_at_step=3"])
    assert first["steps"] == 3 and first["final"] is None
    assert (tmp_path / "checkpoints" / "step-00000003").is_dir()
    assert not (tmp_path / "final").exists()
    second = train_recipe(args)
    assert second["steps"] == 6
    assert loss_curve(tmp_path) == loss_curve(straight)
    assert_same_final(straight, tmp_path)


def test_padded_two_ranks_match_packed_one(tiny_args, straight, tmp_path):
    """Padded forwards under FSDP2 over 2 gloo ranks: the losses and final weights of the single-process run, which
    packs (the CPU default; packed FSDP2 runs are test_two_ranks_match_one and test_packed_resume_is_exact)."""
    args = tiny_args(tmp_path, "schedule.micro_batch_size=1")
    torchrun_train(2, [*args, "schedule.packing=padded"])
    assert loss_curve(tmp_path) == pytest.approx(loss_curve(straight), abs=1e-5)
    assert_same_final(straight, tmp_path, atol=1e-5)


def test_packed_resume_is_exact(tiny_args, tmp_path):
    """Packed forwards of at most 40 real tokens: 3 steps, stop, rerun -> the same losses and final weights, bit
    for bit, as 6 steps straight."""
    packed = "schedule.packing=packed", "schedule.max_tokens_per_forward=40"
    whole = train_recipe(tiny_args(tmp_path / "whole", *packed))
    args = tiny_args(tmp_path / "resumed", *packed)
    assert train_recipe([*args, "schedule.stop_at_step=3"])["steps"] == 3
    assert train_recipe(args)["steps"] == whole["steps"] == 6
    assert loss_curve(tmp_path / "resumed") == loss_curve(tmp_path / "whole")
    assert_same_final(tmp_path / "whole", tmp_path / "resumed")


def test_final_checkpoint_loads_and_embeds(straight, tiny_checkpoint):
    trained = BiEncoder.from_pretrained(straight / "final")
    assert trained.config.query_prefix == "query: " and trained.config.max_length == 48
    emb = trained.encode_queries(["how do i sort item 3", "open a file"])
    assert emb.shape == (2, 64)
    assert abs(float((emb**2).sum(-1)[0]) - 1.0) < 1e-5
    before = BiEncoder.from_pretrained(tiny_checkpoint).encode_queries(
        ["how do i sort item 3", "open a file"]
    )
    assert abs(emb - before).max() > 1e-3  # trained weights, not the initial ones


def test_gradcache_and_matryoshka_in_the_loop(tiny_args, tmp_path):
    """loss.cache_chunk_size changes memory, not the result."""
    extra = ("schedule.max_steps=2", "loss.matryoshka_dims=[16, 64]")
    train_recipe(tiny_args(tmp_path / "plain", *extra))
    train_recipe(tiny_args(tmp_path / "cached", *extra, "loss.cache_chunk_size=1"))
    assert loss_curve(tmp_path / "cached") == pytest.approx(loss_curve(tmp_path / "plain"), abs=1e-5)


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


def _cli_error(args, nproc=1):
    proc = (
        torchrun_train(nproc, args, check=False)
        if nproc > 1
        else subprocess.run(
            [sys.executable, "-m", "bidir_train", "--config", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bidir_train: error:")]
    assert errors, proc.stderr[-3000:]
    if nproc == 1:
        assert "Traceback" not in proc.stderr
    else:  # torchrun reports a failed child with its own launcher traceback; no frame may be bidir's
        assert not [
            line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "bidir" in line
        ]
    return errors[0]


def test_malformed_jsonl_row(tiny_checkpoint, train_jsonl, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = train_jsonl.read_text().splitlines()
    lines[4] = '{"query": "unterminated'
    bad.write_text("\n".join(lines) + "\n")
    message = _cli_error(recipe_args(tiny_checkpoint, bad, tmp_path / "out"))
    assert f"{bad}:5" in message


def test_empty_dataset(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(BidirError, match="no training examples"):
        train_recipe(recipe_args(tiny_checkpoint, empty, tmp_path / "out"))


def test_fewer_rows_than_a_batch(tiny_args, tmp_path):
    with pytest.raises(BidirError, match="fewer than one global batch of 4"):
        train_recipe(tiny_args(tmp_path / "out", "data.max_examples=3"))


def test_more_ranks_than_rows(tiny_args, tmp_path):
    message = _cli_error(
        tiny_args(
            tmp_path / "out",
            "data.max_examples=1",
            "schedule.global_batch_size=2",
            "schedule.micro_batch_size=1",
        ),
        nproc=2,
    )
    assert "1 examples for 2 ranks: more ranks than rows" in message


def test_missing_model_path(train_jsonl, tmp_path):
    message = _cli_error(recipe_args(tmp_path / "no-such-model", train_jsonl, tmp_path / "out"))
    assert "no-such-model: no such file or folder" in message


def test_help_has_an_example():
    proc = subprocess.run(
        [sys.executable, "-m", "bidir_train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    assert "torchrun --nproc-per-node" in proc.stdout


def test_the_source_pooling_is_kept_unless_the_recipe_sets_one(train_jsonl, tmp_path):
    """A causal checkpoint pooled by its last token trains and saves with pooling last when the recipe leaves
    model.pooling unset; an explicit model.pooling wins."""
    import json

    from bidir_core.checkpoint import EncoderConfig
    from bidir_core.testing import tiny_encoder

    source = tmp_path / "causal"
    tiny_encoder(EncoderConfig(pooling="last", attention="causal")).save_pretrained(source)
    one_step = ["schedule.max_steps=1", "eval.dev=null"]
    train_recipe(recipe_args(source, train_jsonl, tmp_path / "kept", *one_step))
    assert json.loads((tmp_path / "kept" / "final" / "bidir.json").read_text())["pooling"] == "last"
    assert json.loads((tmp_path / "kept" / "recipe.json").read_text())["model"]["pooling"] == "last"
    train_recipe(recipe_args(source, train_jsonl, tmp_path / "set", *one_step, "model.pooling=avg"))
    assert json.loads((tmp_path / "set" / "final" / "bidir.json").read_text())["pooling"] == "avg"
    # Unset in the recipe (None) until the trainer reads the source.
    assert load_recipe("tiny").model.pooling is None


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_is_what_the_cpu_computes_natively(
    tiny_checkpoint, train_jsonl, tmp_path, monkeypatch, native
):
    """model.precision=auto trains in bf16 on a CPU with AMX (or AVX512-BF16), in fp32 on one without, and
    recipe.json records which. A resume keeps the recorded one on a CPU that would pick the other (the run
    continues exactly as it started); a fresh start there picks its own."""
    import json

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's answer, on a GPU machine too
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    out = tmp_path / "run"
    args = recipe_args(tiny_checkpoint, train_jsonl, out, "schedule.max_steps=2", "eval.dev=null")
    args += ["model.precision=auto", "checkpoint.every_steps=1"]
    train_recipe([*args, "schedule.stop_at_step=1"])
    started, other = ("bf16", "fp32") if native else ("fp32", "bf16")

    def precision():
        return json.loads((out / "recipe.json").read_text())["model"]["precision"]

    assert precision() == started
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not native)
    train_recipe(args)  # resumed at step 1, as it started
    assert precision() == started and len(loss_curve(out)) == 2
    train_recipe([*args, "checkpoint.resume=false"])
    assert precision() == other
