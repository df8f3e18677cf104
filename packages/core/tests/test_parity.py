"""LlamaBidirectionalModel against the oracle: transformers' LlamaModel with config.is_causal = False, same weights.

Tolerance 1e-5 in fp32: both run the same math in the same precision; only the order of a few reductions may
differ, which moves fp32 results by ~1e-7 relative on these tiny models.
"""

from __future__ import annotations

import json

import pytest
import torch
from parity_testing import first_token_shift, oracle_hidden, oracle_rows, padded_batch
from transformers import AutoModel, LlamaConfig, LlamaModel

from bidir_core import BiEncoder, LlamaBidirectionalModel
from bidir_core.batching import pad_batch
from bidir_core.testing import tiny_model, write_hf_llama

ATOL = 1e-5

VARIANTS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "bias_and_head_dim": {"attention_bias": True, "mlp_bias": True, "head_dim": 32},
    "llamamodel": {"causal_lm": False},
    "tied": {"tie_word_embeddings": True},
    "sharded": {"max_shard_size": "60KB"},
    "llama3_rope": {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "linear_rope": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    # max_position_embeddings below the test's sequence length, so the NTK base really stretches
    "dynamic_rope": {"max_position_embeddings": 12, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "yarn_rope": {
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    },
}


def _oracle(folder) -> LlamaModel:
    config = LlamaConfig.from_pretrained(folder)
    config.is_causal = False
    return AutoModel.from_pretrained(folder, config=config, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hidden_states_match_transformers(tmp_path, variant):
    folder = write_hf_llama(tmp_path / variant, **VARIANTS[variant])
    if variant == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
    ours = LlamaBidirectionalModel.from_pretrained(folder)
    oracle = _oracle(folder)
    for padding_side in ("right", "left"):
        ids, mask = padded_batch(padding_side)
        with torch.no_grad():
            got = ours(ids, mask)
        real = mask.bool()
        # Every row against the oracle on that row alone; for dynamic NTK that is the only comparison, since
        # transformers stretches RoPE by the batch's longest row while bidir uses each row's own length.
        assert torch.allclose(got[real], oracle_rows(oracle, ids, mask)[real], atol=ATOL), (
            variant,
            padding_side,
        )
        if variant != "dynamic_rope":
            want = oracle_hidden(oracle, ids, mask)
            assert torch.allclose(got[real], want[real], atol=ATOL), (variant, padding_side)
    # batch size 1, no padding
    ids, mask = ids[:1, -17:], mask[:1, -17:]
    with torch.no_grad():
        assert torch.allclose(ours(ids, mask), oracle_hidden(oracle, ids, mask), atol=ATOL)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_from_pretrained_of_a_checkpoint_equals_transformers(tmp_path, attention):
    """The public class loads by itself: LlamaBidirectionalModel.from_pretrained of a bidir checkpoint is in eval
    mode and attends as the checkpoint says (its bidir.json), and its last hidden states equal those of
    transformers' LlamaModel reading the same folder as its config.json says (is_causal, no override)."""
    source = write_hf_llama(tmp_path / "hf")
    folder = BiEncoder.from_pretrained(source, attention=attention).save_pretrained(tmp_path / "checkpoint")
    ours = LlamaBidirectionalModel.from_pretrained(folder)
    assert type(ours) is LlamaBidirectionalModel and not ours.training
    assert ours.causal == (attention == "causal")
    oracle = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(oracle) is LlamaModel and oracle.config.is_causal == (attention == "causal")
    for padding_side in ("right", "left"):
        ids, mask = padded_batch(padding_side)
        with torch.no_grad():
            got = ours(ids, mask)
        real = mask.bool()
        assert torch.allclose(got[real], oracle_hidden(oracle, ids, mask)[real], atol=ATOL), padding_side
    # A stock folder is bidirectional unless asked otherwise, and the argument wins over a checkpoint's mode.
    assert not LlamaBidirectionalModel.from_pretrained(source).causal
    flipped = "bidirectional" if attention == "causal" else "causal"
    assert LlamaBidirectionalModel.from_pretrained(folder, attention=flipped).causal == (flipped == "causal")


def test_llama_bidirec_folder_loads_with_its_pooling(tmp_path):
    """An NVIDIA llama_bidirec folder: LlamaModel keys without prefix, model_type llama_bidirec, pooling in config."""
    folder = write_hf_llama(tmp_path / "nv", causal_lm=False)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="llama_bidirec",
        architectures=["LlamaBidirectionalModel"],
        auto_map={"AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel"},
        pooling="last",
        temperature=0.02,
    )
    (folder / "config.json").write_text(json.dumps(config))
    encoder = BiEncoder.from_pretrained(folder)
    assert encoder.config.pooling == "last"
    # an argument overrides it
    assert BiEncoder.from_pretrained(folder, pooling="cls").config.pooling == "cls"
    config["pooling"] = "mean"  # NeMo's name for avg
    (folder / "config.json").write_text(json.dumps(config))
    assert BiEncoder.from_pretrained(folder).config.pooling == "avg"
    ref = LlamaBidirectionalModel.from_pretrained(write_hf_llama(tmp_path / "hf", causal_lm=False))
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, encoder.model.state_dict()[name]), name


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_bidirectional_first_token_sees_last(tmp_path, padding_side):
    ids, mask = padded_batch(padding_side)
    model = tiny_model()
    assert first_token_shift(model, ids[:1, -17:], mask[:1, -17:], row=0) > 1e-3  # batch size 1
    assert first_token_shift(model, ids, mask, row=1) > 1e-3  # a padded row of a batch

    # The same check fails on a causal model: transformers' LlamaModel with its default causal mask.
    folder = write_hf_llama(tmp_path / "causal", causal_lm=False)
    causal = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    assert causal.config.is_causal is not False

    def causal_forward(i, m):
        return oracle_hidden(causal, i, m)

    assert first_token_shift(causal_forward, ids[:1, -17:], mask[:1, -17:], row=0) < 1e-6
    assert first_token_shift(causal_forward, ids, mask, row=1) < 1e-6


def test_bf16_close_to_fp32(tmp_path):
    folder = write_hf_llama(tmp_path / "m")
    ids, mask = padded_batch("right")
    with torch.no_grad():
        fp32 = LlamaBidirectionalModel.from_pretrained(folder)(ids, mask)
        bf16 = LlamaBidirectionalModel.from_pretrained(folder, dtype=torch.bfloat16)(ids, mask)
    assert bf16.dtype == torch.bfloat16
    real = mask.bool()
    cos = torch.nn.functional.cosine_similarity(fp32[real], bf16[real].float(), dim=-1)
    assert cos.min() > 0.99


def test_embedded_default_matches_transformers_gguf_loading(embedded_gguf):
    """Our GGUF import (own dequantization and Q/K un-permutation) against transformers' GGUF loader. 1e-4: both
    dequantize to the same fp32 values, and 30 layers of fp32 accumulate a little more rounding than 2."""
    ours = LlamaBidirectionalModel.from_pretrained(embedded_gguf)
    oracle = AutoModel.from_pretrained(
        embedded_gguf.parent, gguf_file=embedded_gguf.name, dtype=torch.float32
    )
    oracle.config.is_causal = False
    oracle.eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (24, 7)]
    for padding_side in ("right", "left"):
        ids, mask = pad_batch(rows, pad_id=2, padding_side=padding_side)
        with torch.no_grad():
            got = ours(ids, mask)
        want = oracle_hidden(oracle, ids, mask)
        real = mask.bool()
        assert (got[real] - want[real]).abs().max() < 1e-4


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    model = tiny_model()
    want = model.rotary_emb.inv_freq.clone()
    model = model.to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary_emb.inv_freq, want)
