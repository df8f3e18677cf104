"""Each decoder family round-trips checkpoint -> export-onnx (verified) -> batch-embed (torch and onnxruntime,
equal to 1e-4) -> bidir-eval (the family's model encodes the queries, the corpus is the written embeddings),
through the installed CLIs: test_pipeline.embed_eval_chain on a tiny random model of the family, in the attention
mode its real embedders use. That bidir-eval scores written embeddings as it scores the model's own is checked once
per chain in test_pipeline.py, not per family: it is bidir-eval reading an artifact, the same for every family.
Marked slow: each case is four CLI processes."""

from __future__ import annotations

import json

import pytest
from test_pipeline import embed_eval_chain, write_data

from bidir_core.checkpoint import EncoderConfig
from bidir_core.testing import tiny_encoder

CASES = [
    ("mistral", "bidirectional", "avg"),  # e.g. NV-Embed / Nemotron-style bidirectional Mistral
    ("ministral3", "bidirectional", "avg"),  # Nemotron-3-Embed: Ministral3 with is_causal false
    ("qwen2", "bidirectional", "avg"),  # gte-Qwen2
    ("qwen3", "causal", "last"),  # Qwen3-Embedding
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "attention", "pooling"), CASES, ids=[c[0] for c in CASES])
def test_family_round_trip(tmp_path, family, attention, pooling):
    _, beir = write_data(tmp_path, n_train=0, n_queries=8)
    config = EncoderConfig(pooling=pooling, attention=attention, max_length=64)
    ckpt = tiny_encoder(config, family=family).save_pretrained(tmp_path / "ckpt")
    embed_eval_chain(tmp_path, ckpt, beir, against_model=False)
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["encoder"]["attention"] == attention
