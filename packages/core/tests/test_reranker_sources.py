"""Reranker folders bidir loads as they are: NVIDIA's llama_bidirec rerankers (LlamaBidirectionalForSequenceClassification:
avg pooling, bidirectional, config.json temperature) against an independent computation with transformers'
LlamaModel, and stock transformers *ForSequenceClassification folders against transformers itself; and the one-line
refusals of a broken one.

Tolerance 1e-5 in fp32 as in test_cross_encoder.py; the NVIDIA folder's temperature (0.02) scales the logit and its
error by 50, so that comparison is relative: 1e-5 of the largest logit (measured: 7.6e-6 on logits up to 45, 1.7e-7
of it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from errors_testing import edit_json, one_line_error
from safetensors.torch import load_file, save_file

from bidir_core import BidirError, BiEncoder, CrossEncoder, RerankerConfig
from bidir_core.batching import pad_batch
from bidir_core.checkpoint import EncoderConfig, read_encoder_config, read_settings
from bidir_core.reranker_config import NEMO_TEMPLATE
from bidir_core.sources import open_source
from bidir_core.testing import tiny_config, tiny_cross_encoder, write_hf_model, write_nvidia_llama_bidirec

ATOL = 1e-5
PAIRS = [
    ("how do i sort a list", "return a new sorted list from the items in iterable"),
    ("fox", "the quick brown fox jumps over the lazy dog"),
    ("a", "b"),
]


def _nemo_scores(folder, texts: list[str], tokenizer, temperature: float) -> np.ndarray:
    """NeMo's LlamaBidirectionalForSequenceClassification by hand: transformers' LlamaModel attending
    bidirectionally on the folder's `model.*` weights, the mean of the real tokens' states, times score.weight,
    divided by the temperature."""
    weights = load_file(folder / "model.safetensors")
    decoder = transformers.LlamaModel(tiny_config("llama", causal=False)).eval()
    decoder.load_state_dict(
        {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    )
    ids, mask = pad_batch([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H), right-padded
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return (mean @ weights["score.weight"].T)[:, 0].numpy() / temperature


def test_nvidia_reranker_folder_scores_as_nemo(tmp_path):
    marker = tmp_path / "folder-code-ran"
    folder = write_nvidia_llama_bidirec(
        tmp_path / "nv", reranker=True, pooling="avg", temperature=0.02, marker=marker
    )
    source = open_source(folder)
    assert (source.kind, source.format, source.attention) == ("reranker", "llama_bidirec", "bidirectional")
    ce = CrossEncoder.from_pretrained(folder)
    assert ce.config == RerankerConfig(template=NEMO_TEMPLATE, pooling="avg", temperature=0.02)
    want = _nemo_scores(folder, [ce.format(q, p) for q, p in PAIRS], ce.tokenizer, 0.02)
    got = ce.predict(PAIRS)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL * np.abs(want).max())
    assert not marker.exists()


@pytest.mark.parametrize(
    ("pooling", "needle"), [("mean", "pooling 'mean'"), ("weighted_avg", "pooling 'weighted_avg'")]
)
def test_nvidia_reranker_pooling_outside_nemos_is_refused(tmp_path, pooling, needle):
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", reranker=True, pooling=pooling)
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(folder)
    one_line_error(e, str(folder / "config.json"), needle, "avg, cls, last")
    assert CrossEncoder.from_pretrained(folder, pooling="avg").config.pooling == "avg"  # chosen explicitly


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_stock_sequence_classification_folder_scores_as_transformers(tmp_path, family):
    """A transformers *ForSequenceClassification folder loads causal with last pooling (as transformers runs it) and
    gives transformers' logits on the same formatted text."""
    folder = write_hf_model(tmp_path / family, family=family, classifier=True)
    source = open_source(folder)
    assert (source.kind, source.format, source.attention) == ("reranker", "huggingface", "causal")
    ce = CrossEncoder.from_pretrained(folder)
    assert ce.config == RerankerConfig(pooling="last", attention="causal")
    auto = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = ce.tokenizer([ce.format(q, p) for q, p in PAIRS], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = auto(**batch).logits[:, 0].numpy()
    np.testing.assert_allclose(ce.predict(PAIRS), want, atol=ATOL)
    # Saved by bidir, it loads in transformers with the same logits again.
    out = ce.save_pretrained(tmp_path / "saved")
    assert (open_source(out).kind, open_source(out).format) == ("reranker", "checkpoint")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(**batch).logits[:, 0].numpy(), want, atol=ATOL)


def test_classifier_with_two_labels_is_refused(tmp_path):
    folder = write_hf_model(tmp_path / "hf", classifier=True)
    edit_json(folder / "config.json", id2label={"0": "NO", "1": "YES"})
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(folder)
    one_line_error(e, str(folder / "config.json"), "LlamaForSequenceClassification with 2 labels")


def test_head_of_wrong_shape_or_missing_names_the_file(tmp_path):
    folder = write_hf_model(tmp_path / "hf", classifier=True)
    weights_file = folder / "model.safetensors"
    weights = load_file(weights_file)
    save_file(weights | {"score.weight": torch.zeros(1, 32)}, weights_file, metadata={"format": "pt"})
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(folder)
    one_line_error(e, str(weights_file), "score.weight has shape [1, 32]", "[1, 64]")
    save_file(
        weights | {"score.weight": torch.full((1, 64), float("nan"))}, weights_file, metadata={"format": "pt"}
    )
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(folder)
    one_line_error(e, str(weights_file), "not finite")
    del weights["score.weight"]
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(folder)
    one_line_error(e, str(folder), "no score.weight")


def test_reranker_bidir_json_is_checked(tmp_path):
    folder = tiny_cross_encoder().save_pretrained(tmp_path / "rr")
    stored = json.loads((folder / "bidir.json").read_text())
    assert stored["kind"] == "reranker" and stored["template"] == NEMO_TEMPLATE
    edit_json(folder / "bidir.json", template="{passage} only")
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(folder)
    one_line_error(e, str(folder / "bidir.json"), "must contain {query} exactly once")
    edit_json(folder / "bidir.json", template=NEMO_TEMPLATE, normalize=True)
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(folder)
    one_line_error(e, str(folder / "bidir.json"), "unknown key 'normalize'")
    edit_json(folder / "bidir.json", kind="classifier")
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(folder)
    one_line_error(e, str(folder / "bidir.json"), "unknown kind 'classifier'")


def test_classifier_saying_is_causal_false_loads_bidirectional(tmp_path):
    """transformers reads config.json's is_causal, so bidir does too for a *ForSequenceClassification folder."""
    folder = write_hf_model(tmp_path / "hf", classifier=True)
    edit_json(folder / "config.json", is_causal=False)
    assert open_source(folder).attention == "bidirectional"
    assert CrossEncoder.from_pretrained(folder).config.pooling == "last"
    assert open_source(folder, "causal").attention == "causal"  # the caller's choice wins


def test_embedder_bidir_json_with_or_without_kind(bidir_copy):
    """An embedder's bidir.json has no kind (every one written before rerankers) or "kind": "embedder"."""
    assert "kind" not in json.loads((bidir_copy / "bidir.json").read_text())
    before = read_settings(bidir_copy)
    edit_json(bidir_copy / "bidir.json", kind="embedder")
    assert isinstance(before, EncoderConfig) and read_settings(bidir_copy) == before
    assert read_encoder_config(bidir_copy) == before and open_source(bidir_copy).kind == "embedder"
    assert BiEncoder.from_pretrained(bidir_copy).config == before
