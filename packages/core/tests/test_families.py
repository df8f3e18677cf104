"""Every family (Mistral, Ministral, Ministral3, Qwen2, Qwen3; Llama in test_parity.py) against its transformers
oracle (MistralModel, Qwen2Model, ... on the same weights), in both attention modes; the attention span rule
(sliding windows, Ministral3's query scale); the attention mode in the checkpoint.

Tolerance 1e-5 in fp32, as in test_parity.py: the same math in the same precision.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from parity_testing import first_token_shift, oracle_hidden, oracle_rows, padded_batch

from bidir_core import BidirError, BiEncoder, EncoderConfig, LlamaBidirectionalModel
from bidir_core.families import FAMILIES, config_class
from bidir_core.testing import tiny_encoder, write_hf_model

ATOL = 1e-5
NEW_FAMILIES = ("mistral", "ministral", "ministral3", "qwen2", "qwen3")
MODES = ("bidirectional", "causal")


def _oracle(folder, family: str, causal: bool):
    """transformers' own {Family}Model from the folder, with its causal mask on or off (config.is_causal)."""
    config = config_class(family).from_pretrained(folder)
    config.is_causal = causal
    model = transformers.AutoModel.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    assert type(model).__name__ == FAMILIES[family].hf_model
    return model


@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize("family", ("llama", *NEW_FAMILIES))  # Llama's variants: test_parity.py
def test_hidden_states_match_transformers(tmp_path, family, attention):
    folder = write_hf_model(tmp_path / family, family=family)
    ours = LlamaBidirectionalModel.from_pretrained(folder, attention=attention)
    assert ours.causal == (attention == "causal")
    oracle = _oracle(folder, family, causal=attention == "causal")
    for padding_side in ("right", "left"):
        ids, mask = padded_batch(padding_side)
        with torch.no_grad():
            got = ours(ids, mask)
        real = mask.bool()
        assert torch.isfinite(got).all()  # padding rows too: a causal left-padded row has no earlier real key
        assert torch.allclose(got[real], oracle_hidden(oracle, ids, mask)[real], atol=ATOL), padding_side
        assert torch.allclose(got[real], oracle_rows(oracle, ids, mask)[real], atol=ATOL), padding_side
    ids, mask = ids[:1, -17:], mask[:1, -17:]  # batch size 1, no padding
    with torch.no_grad():
        assert torch.allclose(ours(ids, mask), oracle_hidden(oracle, ids, mask), atol=ATOL)


@pytest.mark.parametrize("family", ("llama", *NEW_FAMILIES))
def test_first_token_sees_the_last_only_when_bidirectional(tmp_path, family):
    folder = write_hf_model(tmp_path / family, family=family)
    bidirectional, causal = (
        LlamaBidirectionalModel.from_pretrained(folder),
        LlamaBidirectionalModel.from_pretrained(folder, attention="causal"),
    )
    for padding_side in ("right", "left"):
        ids, mask = padded_batch(padding_side)
        for row_ids, row_mask, row in ((ids[:1, -17:], mask[:1, -17:], 0), (ids, mask, 1)):
            assert first_token_shift(bidirectional, row_ids, row_mask, row) > 1e-3, padding_side
            assert first_token_shift(causal, row_ids, row_mask, row) == 0.0, padding_side


def test_family_weights_differ_where_the_family_does():
    """Qwen2: bias on q/k/v, none on o; Qwen3: q_norm / k_norm over the head dim (32 here); the rest: Llama's."""
    keys = {f: set(tiny_encoder(family=f).model.state_dict()) for f in ("llama", *NEW_FAMILIES)}
    attn = "layers.0.self_attn."
    assert {attn + f"{p}_proj.bias" for p in "qkv"} <= keys["qwen2"] and attn + "o_proj.bias" not in keys[
        "qwen2"
    ]
    assert tiny_encoder(family="qwen3").model.state_dict()[attn + "q_norm.weight"].shape == (32,)
    for family in ("mistral", "ministral", "ministral3"):
        assert keys[family] == keys["llama"], family
    assert keys["qwen3"] - keys["llama"] == {
        f"layers.{i}.self_attn.{n}_norm.weight" for i in (0, 1) for n in "qk"
    }


# (family, config overrides that make attention depend on length, the key the refusal names, span)
SPANS = [
    ("mistral", {"sliding_window": 16}, "sliding_window", 16),
    # Qwen2 slides only with use_sliding_window, on the layers from max_window_layers on
    (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
        "sliding_window",
        16,
    ),
    ("ministral", {"sliding_window": 16}, "sliding_window", 16),
    (
        "ministral3",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "llama_4_scaling_beta": 0.1,
            }
        },
        "rope_parameters.original_max_position_embeddings",
        16,
    ),
]


@pytest.mark.parametrize(("family", "overrides", "key", "span"), SPANS, ids=[s[0] for s in SPANS])
def test_attention_span_is_refused_past_its_end(tmp_path, family, overrides, key, span):
    """A max_length longer than the config's sliding window (or Ministral3's unscaled range) is refused in one line
    naming the key; up to it, bidir equals transformers with the window (or the scale) on, in both modes; past it
    transformers' attention really differs, so the bound is where it must be."""
    folder = write_hf_model(tmp_path / family, family=family, **overrides)
    with pytest.raises(BidirError) as e:
        BiEncoder.from_pretrained(folder, max_length=span + 1)
    assert "\n" not in str(e.value) and str(folder / "config.json") in str(e.value)
    assert f"{key}={span}" in str(e.value) and f"max_length <= {span}" in str(e.value)
    for attention in MODES:
        encoder = BiEncoder.from_pretrained(folder, max_length=span, attention=attention)
        oracle = _oracle(folder, family, causal=attention == "causal")
        ids = torch.randint(3, 320, (1, span + 4), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            at_span, past_span = encoder.model(ids[:, :span], mask[:, :span]), encoder.model(ids, mask)
        want = oracle_hidden(oracle, ids[:, :span], mask[:, :span])
        assert torch.allclose(at_span, want, atol=ATOL), attention
        # past the span (span + 4 tokens) the oracle's last token differs from full attention's
        assert (past_span[0, -1] - oracle_hidden(oracle, ids, mask)[0, -1]).abs().max() > 1e-3, attention
    with pytest.raises(BidirError, match=key):  # also when the encoder is built from a model directly
        BiEncoder(encoder.model, encoder.tokenizer, EncoderConfig(max_length=span + 1, attention="causal"))


def test_unknown_model_type_is_one_line(tmp_path):
    folder = write_hf_model(tmp_path / "m", family="qwen2")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gemma3"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BidirError) as e:
        LlamaBidirectionalModel.from_pretrained(folder)
    message = str(e.value)
    assert "\n" not in message and str(folder / "config.json") in message and "'gemma3'" in message
    assert "'qwen3'" in message  # says what loads


def test_bad_attention_mode_is_one_line(tmp_path):
    with pytest.raises(BidirError, match="attention must be one of bidirectional, causal, got 'sideways'"):
        EncoderConfig(attention="sideways")
    folder = tiny_encoder().save_pretrained(tmp_path / "c")
    bidir = json.loads((folder / "bidir.json").read_text())
    (folder / "bidir.json").write_text(json.dumps({**bidir, "attention": "sideways"}))
    with pytest.raises(BidirError) as e:
        LlamaBidirectionalModel.from_pretrained(folder)
    assert "\n" not in str(e.value) and "bidir.json" in str(e.value) and "sideways" in str(e.value)


def test_config_json_contradicting_bidir_json_is_refused(tmp_path):
    folder = tiny_encoder(EncoderConfig(attention="causal", pooling="last")).save_pretrained(tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "is_causal": False}))
    with pytest.raises(
        BidirError, match=r"config.json: is_causal=false contradicts bidir.json's attention='causal'"
    ):
        BiEncoder.from_pretrained(folder)


def test_model_and_encoder_config_must_agree():
    causal_model = tiny_encoder(EncoderConfig(attention="causal")).model
    with pytest.raises(
        BidirError, match="attends causally but the encoder config says attention='bidirectional'"
    ):
        BiEncoder(causal_model, None, EncoderConfig())
    assert BiEncoder(causal_model, None).config.attention == "causal"  # no config: the model's mode


TEXTS = ["the quick brown fox", "x", "bidirectional attention lets every token see the future, and more text"]


@pytest.mark.parametrize(
    ("family", "attention", "pooling"),
    [("qwen3", "causal", "last"), ("mistral", "causal", "last"), ("qwen2", "bidirectional", "avg")],
)
def test_checkpoint_says_its_mode_to_transformers_and_sentence_transformers(
    tmp_path, family, attention, pooling
):
    """Our checkpoint of a causal Qwen3 (as Qwen3-Embedding) loads in transformers as a causal Qwen3Model
    (config.is_causal true), and in sentence-transformers with the same embeddings; reloaded in bidir, causal."""
    from sentence_transformers import SentenceTransformer

    encoder = tiny_encoder(EncoderConfig(attention=attention, pooling=pooling), family=family)
    folder = encoder.save_pretrained(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [FAMILIES[family].hf_model]
    assert config["is_causal"] is (attention == "causal")
    assert json.loads((folder / "bidir.json").read_text())["attention"] == attention

    hf = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == FAMILIES[family].hf_model and hf.config.is_causal is (attention == "causal")
    ids, mask = padded_batch("right")
    with torch.no_grad():
        want = encoder.model(ids, mask)
    real = mask.bool()
    assert torch.allclose(oracle_hidden(hf, ids, mask)[real], want[real], atol=ATOL)

    st = SentenceTransformer(str(folder), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), encoder.encode(TEXTS), atol=1e-5)
    loaded = BiEncoder.from_pretrained(folder)
    assert loaded.config == encoder.config and loaded.model.causal is (attention == "causal")
    np.testing.assert_array_equal(loaded.encode(TEXTS), encoder.encode(TEXTS))


def test_causal_source_defaults_to_last_pooling(tmp_path):
    folder = write_hf_model(tmp_path / "qwen3", family="qwen3")
    assert BiEncoder.from_pretrained(folder).config.pooling == "avg"  # a stock folder: bidirectional, avg
    causal = BiEncoder.from_pretrained(folder, attention="causal")
    assert causal.config.attention == "causal" and causal.config.pooling == "last" and causal.model.causal
    assert BiEncoder.from_pretrained(folder, attention="causal", pooling="avg").config.pooling == "avg"


def test_attention_span_reads_the_layers_that_slide():
    """Qwen2/Qwen3/Ministral slide only on layers layer_types marks; Mistral on every layer when sliding_window
    is set; no window, no limit."""
    from bidir_core.families import attention_span
    from bidir_core.testing import tiny_config

    # use_sliding_window, but max_window_layers = every layer: no layer slides
    assert (
        attention_span(tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2))
        is None
    )
    assert attention_span(
        tiny_config("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    ) == (
        8,
        "sliding_window",
    )
    assert attention_span(tiny_config("qwen2", sliding_window=8)) is None  # use_sliding_window false
    assert attention_span(tiny_config("mistral", sliding_window=None)) is None
    assert attention_span(tiny_config("mistral", sliding_window=8)) == (8, "sliding_window")
    assert (
        attention_span(tiny_config("ministral", sliding_window=8, layer_types=["full_attention"] * 2)) is None
    )
    assert attention_span(tiny_config("llama")) is None
    assert attention_span(tiny_config("ministral3")) == (
        512,
        "rope_parameters.original_max_position_embeddings",
    )


@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize("family", ("llama", *NEW_FAMILIES))
def test_packed_equals_padded_per_family(tmp_path, family, attention):
    """The packed path (bidir_core.packed) runs every family and both modes as the padded one does."""
    from bidir_core.batching import pad_batch
    from bidir_core.packed import pack

    model = LlamaBidirectionalModel.from_pretrained(
        write_hf_model(tmp_path / family, family=family), attention=attention
    )
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (11, 1, 6, 17)]
    with torch.no_grad():
        got = model(pack(rows))  # (N, H)
        for side in ("right", "left"):
            ids, mask = pad_batch(rows, pad_id=0, padding_side=side)
            want = model(ids, mask)[mask.bool()]
            assert torch.allclose(got, want, atol=ATOL), (side, (got - want).abs().max())
