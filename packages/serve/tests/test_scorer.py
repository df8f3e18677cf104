"""The torch scorer gives CrossEncoder.predict's logits from pair rows (tokenized by the core tokenize_pairs), and
load_backend returns it for a reranker checkpoint.

Tolerance 1e-5, as core's reranker parity tests: the same fp32 model on CPU, one dot product of the pooled states
with the head (measured: 0 between the scorer and predict, which run the same packed forward).
"""

from __future__ import annotations

import numpy as np
import pytest

from bidir_core import BidirError
from bidir_core.reranker_config import tokenize_pairs
from bidir_serve.backends import TorchBackend, TorchScorer, backend_kind, load_backend

ATOL = 1e-5


def pairs_of(texts: list[str]) -> list[tuple[str, str]]:
    """Queries (the short texts) with passages of every length, the longest cut to max_length."""
    return [(texts[i % 7][:40], texts[-1 - i]) for i in range(len(texts))]


def _score_all(scorer, pairs, batch_size=7):
    ids, _ = tokenize_pairs(scorer.tokenizer, scorer.config, pairs)
    out = []
    for i in range(0, len(ids), batch_size):  # input order: pairs of very different lengths share a batch
        scores = scorer.score(scorer.prepare(ids[i : i + batch_size]))
        assert (
            isinstance(scores, np.ndarray)
            and scores.dtype == np.float32
            and scores.shape == (len(ids[i : i + batch_size]),)
        )
        out.append(scores)
    return np.concatenate(out)


@pytest.mark.parametrize("packed", [True, False])
def test_torch_scorer_matches_predict(reranker_checkpoint, reranker, texts, packed):
    pairs = pairs_of(texts)
    scorer = TorchScorer(reranker_checkpoint, device="cpu", packed=packed)
    assert (scorer.kind, scorer.name, scorer.precision) == ("reranker", "torch", "fp32")
    assert scorer.config == reranker.config and scorer.description == "torch cpu fp32 reranker"
    with pytest.warns(UserWarning, match="truncated"):
        expected = reranker.predict(pairs)
    np.testing.assert_allclose(_score_all(scorer, pairs), expected, atol=ATOL, rtol=0)


def test_load_backend_returns_a_scorer_for_a_reranker(reranker_checkpoint, tiny_checkpoint):
    scorer = load_backend(reranker_checkpoint, device="cpu")  # auto: a checkpoint -> torch
    assert isinstance(scorer, TorchScorer) and backend_kind(scorer) == "reranker"
    embedder = load_backend(tiny_checkpoint, "torch", device="cpu")
    assert isinstance(embedder, TorchBackend) and backend_kind(embedder) == "embedder" == embedder.kind
    assert scorer.fingerprint.startswith("sha256:") and scorer.fingerprint != embedder.fingerprint
    with pytest.raises(BidirError, match="^torch cpu fp32 reranker: a reranker has no embedding dim;[^\n]*$"):
        _ = scorer.dim
    with pytest.raises(
        BidirError, match="a reranker gives one score per pair, it has no embedding dim to cut \\(dim=16\\)$"
    ) as e:
        load_backend(reranker_checkpoint, "torch", dim=16, device="cpu")
    assert str(e.value).startswith(str(reranker_checkpoint))


@pytest.mark.gpu
def test_torch_scorer_cuda(reranker_checkpoint, reranker, texts):
    """On CUDA: fp32 equals the CPU reranker (1e-4: other kernels, same math); bf16 keeps fp32 scores (the head runs
    in fp32) within 0.05 of them (bf16 decoder states: ~3 significant digits)."""
    pairs = pairs_of(texts)
    with pytest.warns(UserWarning, match="truncated"):
        expected = reranker.predict(pairs)
    fp32 = load_backend(reranker_checkpoint, "torch", device="cuda", precision="fp32")
    assert fp32.prepare([[1, 5, 9], [1, 22]]).input_ids.is_pinned()
    np.testing.assert_allclose(_score_all(fp32, pairs), expected, atol=1e-4, rtol=0)
    bf16 = load_backend(reranker_checkpoint, device="cuda")
    assert bf16.precision == "bf16"
    got = _score_all(bf16, pairs)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=0.05, rtol=0)
