"""ScoringGraph is CrossEncoder's scoring path as one module of (input_ids, attention_mask): the same logits as
forward / predict, padded on either side, in float64 too, and it exports with torch.export with dynamic batch and
sequence (the step the ONNX exporter runs).

Tolerance 1e-5: the same fp32 ops as predict on CPU, which packs rather than pads (the two differ by rounding).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.export import Dim, export

from bidir_core.batching import pad_batch
from bidir_core.reranker_config import RerankerConfig
from bidir_core.scoring_graph import ScoringGraph
from bidir_core.testing import tiny_cross_encoder

PAIRS = [("how do i sort a list", "return a new sorted list"), ("fox", "the quick brown fox"), ("a", "b")]


@pytest.mark.parametrize(
    "config",
    [RerankerConfig(temperature=0.5), RerankerConfig(pooling="last", attention="causal")],
    ids=["avg-bidirectional", "last-causal"],
)
@pytest.mark.parametrize("side", ["right", "left"])
def test_graph_scores_as_predict(config, side):
    ce = tiny_cross_encoder(config).eval()
    graph = ScoringGraph(ce).eval()
    ids, mask = pad_batch(ce.tokenize_pairs(PAIRS)[0], ce.tokenizer.pad_token_id, side)
    with torch.no_grad():
        scores = graph(ids, mask)
        wide = ScoringGraph(copy.deepcopy(ce).double())(ids, mask)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and wide.dtype == torch.float64
    np.testing.assert_allclose(scores.numpy(), ce.predict(PAIRS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(wide.numpy(), scores.numpy(), atol=1e-5, rtol=0)


def test_graph_exports_with_dynamic_shapes():
    ce = tiny_cross_encoder(RerankerConfig(temperature=0.5)).eval()
    graph = ScoringGraph(ce).eval()
    ids, mask = pad_batch(ce.tokenize_pairs(PAIRS[:2])[0], 0)
    dynamic = {
        "input_ids": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC},
        "attention_mask": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC},
    }
    program = export(graph, (ids, mask), dynamic_shapes=dynamic)
    other_ids, other_mask = pad_batch(ce.tokenize_pairs(PAIRS)[0], 0, "left")  # another batch and length
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(other_ids, other_mask), graph(other_ids, other_mask), atol=1e-5, rtol=0
        )
