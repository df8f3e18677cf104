"""bidir_core.hf_folder: a Hugging Face folder's config.json and weight files (safetensors, sharded or not, and
pytorch_model.bin); a damaged one is refused with one line naming the file and what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from errors_testing import edit_json, load_error, one_line_error

from bidir_core import BiEncoder
from bidir_core.testing import write_hf_llama

# --- config.json --------------------------------------------------------------------------------------------------


def test_non_llama_model_type(hf_copy):
    edit_json(hf_copy / "config.json", model_type="bert")
    one_line_error(load_error(hf_copy), str(hf_copy / "config.json"), "'bert'")


def test_config_without_model_type(hf_copy):
    config = json.loads((hf_copy / "config.json").read_text())
    del config["model_type"]
    (hf_copy / "config.json").write_text(json.dumps(config))
    one_line_error(load_error(hf_copy), str(hf_copy / "config.json"), "model_type")


def test_invalid_json_config(hf_copy):
    (hf_copy / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    one_line_error(load_error(hf_copy), str(hf_copy / "config.json"), "not valid JSON")


def test_config_json_not_an_object(hf_copy):
    (hf_copy / "config.json").write_text("[1, 2, 3]")
    one_line_error(load_error(hf_copy), str(hf_copy / "config.json"))


@pytest.mark.parametrize(
    "change",
    [{"num_attention_heads": 5}, {"hidden_size": "64"}],
    ids=["heads-do-not-divide-hidden", "hidden-size-is-a-string"],
)
def test_config_values_transformers_rejects(hf_copy, change):
    edit_json(hf_copy / "config.json", **change)
    one_line_error(load_error(hf_copy), str(hf_copy / "config.json"))


@pytest.mark.parametrize(
    "key", ["max_position_embeddings", "num_key_value_heads", "head_dim", "intermediate_size"]
)
@pytest.mark.parametrize("value", [-5, 0])
def test_non_positive_sizes_in_config(hf_copy, key, value):
    # Regression: max_position_embeddings -5 was accepted.
    edit_json(hf_copy / "config.json", **{key: value})
    one_line_error(load_error(hf_copy), str(hf_copy / "config.json"), key)


# --- weights ------------------------------------------------------------------------------------------------------


def test_corrupt_safetensors(hf_copy):
    weights = hf_copy / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 64)
    one_line_error(load_error(hf_copy), str(weights), "safetensors")


def test_truncated_safetensors(hf_copy):
    weights = hf_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_line_error(load_error(hf_copy), str(weights), "truncated")


def test_no_weights(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    one_line_error(load_error(hf_copy), str(hf_copy), "no weights")


def test_corrupt_pytorch_bin(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    (hf_copy / "pytorch_model.bin").write_bytes(b"not a zip or a pickle" * 8)
    one_line_error(load_error(hf_copy), str(hf_copy / "pytorch_model.bin"))


class _NotAllowed:
    """A pickled global that torch.load(weights_only=True) refuses."""


def test_pytorch_bin_with_disallowed_pickle_global(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _NotAllowed()}, hf_copy / "pytorch_model.bin")
    one_line_error(load_error(hf_copy), str(hf_copy / "pytorch_model.bin"))


def test_shard_index_names_a_missing_shard(hf_source, tmp_path):
    sharded = write_hf_llama(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (sharded / shards[1]).unlink()
    one_line_error(load_error(sharded), str(sharded / "model.safetensors.index.json"), shards[1], "missing")


@pytest.mark.parametrize("outside", ["../other/model.safetensors", "absolute"])
def test_shard_index_naming_a_file_outside_the_folder(tmp_path, outside):
    # Regression: an index entry "../../other/model.safetensors" was read from outside the checkpoint folder.
    sharded = write_hf_llama(tmp_path / "sharded", max_shard_size="100KB")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "other").mkdir()
    moved = shutil.move(sharded / shard, tmp_path / "other" / "model.safetensors")  # a valid shard, elsewhere
    entry = str(moved) if outside == "absolute" else outside
    index["weight_map"] = {k: entry if v == shard else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    one_line_error(load_error(sharded), str(index_path), repr(entry), "outside")


def test_shards_linked_into_a_cache_folder_still_load(tmp_path):
    """The Hugging Face cache layout: snapshots/<rev>/<shard> is a link to ../../blobs/<sha>, outside the folder the
    index is in. The index names files in its own folder, so they are read (the check is on names, not targets)."""
    sharded = write_hf_llama(tmp_path / "repo" / "snapshots" / "rev", max_shard_size="100KB")
    blobs = tmp_path / "repo" / "blobs"
    blobs.mkdir()
    shards = sorted(p for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1
    for i, shard in enumerate(shards):
        shutil.move(shard, blobs / f"sha{i}")
        shard.symlink_to(Path("..", "..", "blobs", f"sha{i}"))
    want = BiEncoder.from_pretrained(write_hf_llama(tmp_path / "plain")).model.state_dict()
    got = BiEncoder.from_pretrained(sharded).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_invalid_shard_index(hf_copy):
    (hf_copy / "model.safetensors.index.json").write_text('{"metadata": {}}')
    one_line_error(load_error(hf_copy), "model.safetensors.index.json", "weight_map")


def test_corrupt_shard_names_that_shard(tmp_path):
    sharded = write_hf_llama(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:100])
    one_line_error(load_error(sharded), str(shards[-1]))
