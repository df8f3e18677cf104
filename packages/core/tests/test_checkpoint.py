"""bidir_core.checkpoint: the checkpoint artifact loads back into bidir bit-exactly, into transformers with the same
hidden states and into sentence-transformers with the same embeddings; a bad bidir.json is refused in one line; a
save never replaces what is not a bidir checkpoint and never leaves a half-written folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from errors_testing import edit_json, load_error, one_line_error
from safetensors import safe_open

from bidir_core import BidirError, BiEncoder, EncoderConfig, LlamaBidirectionalModel
from bidir_core.batching import pad_batch
from bidir_core.checkpoint import read_encoder_config, write_checkpoint
from bidir_core.testing import tiny_encoder

TEXTS = [
    "the quick brown fox",
    "bidirectional attention lets every token see the future, and a much longer sentence follows here",
    "x",
    "how do I sort a list in python?",
]


@pytest.fixture
def saved(tmp_path):
    encoder = tiny_encoder(EncoderConfig(pooling="avg", matryoshka_dims=(32, 16), max_length=64))
    return encoder, encoder.save_pretrained(tmp_path / "ckpt")


def test_round_trip_is_bit_exact(saved):
    encoder, folder = saved
    loaded = BiEncoder.from_pretrained(folder)
    assert loaded.config == encoder.config
    want = encoder.model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert np.array_equal(loaded.encode(TEXTS), encoder.encode(TEXTS))


def test_given_config_replaces_the_stored_one_whole(saved):
    """from_pretrained(config=...) (an export manifest's settings) ignores bidir.json; arguments still override."""
    _, folder = saved
    given = EncoderConfig(pooling="last", normalize=False, query_prefix="q ", max_length=16)
    assert BiEncoder.from_pretrained(folder, config=given).config == given
    loaded = BiEncoder.from_pretrained(folder, config=given, pooling="cls")
    assert loaded.config == EncoderConfig(pooling="cls", normalize=False, query_prefix="q ", max_length=16)


def test_files_and_config(saved):
    encoder, folder = saved
    for name in ("config.json", "model.safetensors", "tokenizer.json", "bidir.json", "modules.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["is_causal"] is False
    assert config["architectures"] == ["LlamaModel"]
    assert config["rope_theta"] == encoder.model.config.rope_parameters["rope_theta"]  # for pre-v5 readers
    bidir = json.loads((folder / "bidir.json").read_text())
    assert bidir["format_version"] == 1 and bidir["matryoshka_dims"] == [32, 16]
    assert read_encoder_config(folder) == encoder.config
    assert not list(folder.parent.glob(".*tmp*")), "temporary folder left behind"


def test_sharded_and_bf16(tmp_path):
    encoder = tiny_encoder()
    model = LlamaBidirectionalModel.from_state_dict(
        encoder.model.config, {k: v.to(torch.bfloat16) for k, v in encoder.model.state_dict().items()}
    )
    folder = write_checkpoint(
        tmp_path / "c", model, encoder.tokenizer, encoder.config, max_shard_bytes=40_000
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    with safe_open(folder / shards[0], framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    loaded = LlamaBidirectionalModel.from_pretrained(folder, dtype=torch.bfloat16)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_loads_in_transformers_with_same_hidden_states(saved):
    from transformers import AutoModel

    encoder, folder = saved
    hf = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaModel" and hf.config.is_causal is False
    # right padding, as the tokenizer does
    ids, mask = pad_batch([[1, 5, 9, 40, 77, 3, 8], [1, 22, 31]], pad_id=0)
    with torch.no_grad():
        want = encoder.model(ids, mask)
        got = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)


@pytest.mark.parametrize("pooling", ["avg", "cls", "last", "weighted_avg"])
@pytest.mark.parametrize("normalize", [True, False])
def test_loads_in_sentence_transformers_with_same_embeddings(tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    encoder = tiny_encoder(EncoderConfig(pooling=pooling, normalize=normalize))
    folder = encoder.save_pretrained(tmp_path / "st")
    st = SentenceTransformer(str(folder), device="cpu")
    got = st.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(got, encoder.encode(TEXTS), atol=1e-5)
    # The query/passage prefixes travel as sentence-transformers prompts, applied once on each side.
    np.testing.assert_allclose(
        st.encode(TEXTS, prompt_name="query"), encoder.encode_queries(TEXTS), atol=1e-5
    )
    np.testing.assert_allclose(
        st.encode(TEXTS, prompt_name="document"), encoder.encode_documents(TEXTS), atol=1e-5
    )


def test_embedded_default_imported_once(embedded_gguf):
    from bidir_core.embedded import embedded_checkpoint

    folder = embedded_checkpoint()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    encoder = BiEncoder.from_pretrained("smollm2-135m")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # the second use reads the cache
    assert encoder.hidden_size == 576 and len(encoder.model.layers) == 30
    texts = ["A man is playing a guitar.", "The stock market fell."]
    emb = encoder.encode(texts)
    assert emb.shape == (2, 576)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # The cached checkpoint (weights, tokenizer, settings) encodes exactly like reading the GGUF directly.
    np.testing.assert_array_equal(BiEncoder.from_pretrained(embedded_gguf).encode(texts), emb)


def test_overwrite_swaps_a_bidir_checkpoint_and_never_a_plain_folder(tmp_path):
    from bidir_core import BidirError
    from bidir_core.testing import write_hf_llama

    first = tiny_encoder(EncoderConfig(pooling="avg"))
    folder = first.save_pretrained(tmp_path / "ckpt")
    second = tiny_encoder(EncoderConfig(pooling="last"), seed=1)
    second.save_pretrained(folder, overwrite=True)
    assert read_encoder_config(folder).pooling == "last"
    np.testing.assert_array_equal(BiEncoder.from_pretrained(folder).encode(TEXTS), second.encode(TEXTS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "old or temporary folders left behind"

    # A Hugging Face folder (no bidir.json) is never replaced, even with overwrite, even when it is the source.
    hf = write_hf_llama(tmp_path / "hf")
    before = sorted(p.name for p in hf.iterdir())
    with pytest.raises(BidirError, match="not a bidir checkpoint"):
        BiEncoder.from_pretrained(hf).save_pretrained(hf, overwrite=True)
    assert sorted(p.name for p in hf.iterdir()) == before


def test_pytorch_bin_folder_loads_like_safetensors(tmp_path):
    from transformers import LlamaForCausalLM

    from bidir_core.testing import write_hf_llama

    folder = write_hf_llama(tmp_path / "st")
    model = LlamaForCausalLM.from_pretrained(folder)
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    torch.save(model.state_dict(), bin_folder / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bin_folder / name).write_bytes((folder / name).read_bytes())
    want = LlamaBidirectionalModel.from_pretrained(folder).state_dict()
    got = LlamaBidirectionalModel.from_pretrained(bin_folder).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_lm_head_of_untied_sources_only(tmp_path, embedded_gguf):
    """load_lm_head (MNTP's untied head): lm_head.weight from safetensors (sharded too) and .bin folders; None for
    a bidir checkpoint (an embedder has no head) and for the tied SmolLM2 GGUF (no output.weight)."""
    from transformers import LlamaForCausalLM

    from bidir_core.sources import load_lm_head
    from bidir_core.testing import write_hf_llama

    folder = write_hf_llama(tmp_path / "st", max_shard_size="20KB")
    want = LlamaForCausalLM.from_pretrained(folder).lm_head.weight.detach()
    assert torch.equal(load_lm_head(folder, torch.float32), want)
    assert load_lm_head(folder, torch.bfloat16).dtype == torch.bfloat16
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    torch.save({"lm_head.weight": want.clone()}, bin_folder / "pytorch_model.bin")
    assert torch.equal(load_lm_head(bin_folder, torch.float32), want)
    assert load_lm_head(tiny_encoder().save_pretrained(tmp_path / "bidir"), torch.float32) is None
    assert load_lm_head(embedded_gguf, torch.float32) is None


# --- bidir.json ---------------------------------------------------------------------------------------------------


def test_bidir_json_unknown_format_version(bidir_copy):
    edit_json(bidir_copy / "bidir.json", format_version=99)
    one_line_error(load_error(bidir_copy), str(bidir_copy / "bidir.json"), "format_version", "99")


def test_bidir_json_without_format_version(bidir_copy):
    config = json.loads((bidir_copy / "bidir.json").read_text())
    del config["format_version"]
    (bidir_copy / "bidir.json").write_text(json.dumps(config))
    one_line_error(load_error(bidir_copy), str(bidir_copy / "bidir.json"), "format_version")


def test_bidir_json_unknown_key(bidir_copy):
    edit_json(bidir_copy / "bidir.json", poolin="cls")
    message = one_line_error(load_error(bidir_copy), str(bidir_copy / "bidir.json"), "'poolin'")
    assert "pooling" in message  # the known keys are listed


def test_bidir_json_invalid_json(bidir_copy):
    (bidir_copy / "bidir.json").write_text("{format_version: 1")
    one_line_error(load_error(bidir_copy), str(bidir_copy / "bidir.json"), "not valid JSON")


def test_bidir_json_unknown_pooling_value(bidir_copy):
    edit_json(bidir_copy / "bidir.json", pooling="max")
    one_line_error(load_error(bidir_copy), "'max'")


@pytest.mark.parametrize(
    "content", ["[1, 2]", '{"format_version": 1, "matryoshka_dims": 8}'], ids=["list", "dims"]
)
def test_bidir_json_wrong_shape(bidir_copy, content):
    (bidir_copy / "bidir.json").write_text(content)
    one_line_error(load_error(bidir_copy), str(bidir_copy / "bidir.json"))


def test_bidir_json_normalize_must_be_a_bool(bidir_copy):
    edit_json(bidir_copy / "bidir.json", normalize="false")
    one_line_error(load_error(bidir_copy), "normalize")


# --- saving -------------------------------------------------------------------------------------------------------


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
    one_line_error(excinfo, str(target), "not empty")
    with pytest.raises(BidirError) as excinfo:
        encoder.save_pretrained(target, overwrite=True)  # overwrite replaces model folders only
    one_line_error(excinfo, str(target), "not a bidir checkpoint")

    assert _snapshot(target) == before
    assert not list(tmp_path.glob("*.tmp-*"))


def test_overwrite_replaces_only_a_bidir_checkpoint(encoder, tmp_path):
    # Regression (bidir-convert's --overwrite): any folder with a bidir.json was deleted, whatever else it held.
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
        one_line_error(excinfo, str(target), *needles)
        assert _snapshot(target) == before
    assert not list(tmp_path.glob(".*"))


def test_save_onto_a_file_refuses(encoder, tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(BidirError) as excinfo:
        encoder.save_pretrained(target, overwrite=True)
    one_line_error(excinfo, str(target), "not a folder")
    assert target.read_text() == "a file"


def test_save_onto_existing_checkpoint_needs_overwrite(encoder, tmp_path):
    target = encoder.save_pretrained(tmp_path / "ckpt")
    before = _snapshot(target)
    other = tiny_encoder(seed=1)
    with pytest.raises(BidirError) as excinfo:
        other.save_pretrained(target)
    one_line_error(excinfo, str(target), "overwrite")
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
    one_line_error(excinfo, str(target), "not written", "simulated")
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
