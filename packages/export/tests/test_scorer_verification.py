"""The verification rule for a reranker's scores: its error measure by hand, the real-pair batches it runs on, and
that it rejects broken scoring graphs.

Each broken graph is the tiny reranker's scoring path with one fault, judged against the intact reranker: another
pooling (last for avg: transformers' pooling where the checkpoint has NeMo's), the temperature left out (the
checkpoint's is 0.5), the padding mask dropped in attention, and the last layer missing. All must fail, far outside
the bound and above MAX_ERROR, in fp32 and fp16; the intact graph passes in both. One fault also goes through a real
ONNX export and onnxruntime. (weighted_avg for avg, the closest pooling, is 0.09 off on this model: it fails fp32
and fp16 by 8x or more, but is under MAX_ERROR.)
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from export_testing import SMALL_VERIFY

from bidir_core.artifacts import read_manifest
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.scoring_graph import SCORES, ScoringGraph
from bidir_core.testing import TINY_VOCAB_SIZE
from bidir_export.onnx_export import ATTENTION_KEY, MODEL_FILE, _export_graph, run_verification
from bidir_export.verification import (
    FACTOR,
    MAX_ERROR,
    Batch,
    Reference,
    compare,
    low_precision_copy,
    pair_batches,
    reference_outputs,
    score_error,
)


@pytest.fixture(scope="module")
def reranker(tiny_reranker) -> CrossEncoder:
    return CrossEncoder.from_pretrained(tiny_reranker).eval()


def _verify(reranker: CrossEncoder, artifact: torch.nn.Module, dtype: str = "fp32"):
    batches = pair_batches(reranker, SMALL_VERIFY)
    expected = reference_outputs(ScoringGraph(reranker), batches, dtype)

    def run(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return artifact(batch.input_ids, batch.attention_mask)

    return compare(batches, expected, run, dtype, "torch (test)")


def _other_pooling(reranker: CrossEncoder) -> ScoringGraph:
    broken = copy.deepcopy(reranker)
    broken.config = dataclasses.replace(reranker.config, pooling="last")
    return ScoringGraph(broken)


def _without_temperature(reranker: CrossEncoder) -> ScoringGraph:
    broken = copy.deepcopy(reranker)
    broken.config = dataclasses.replace(reranker.config, temperature=1.0)
    return ScoringGraph(broken)


class IgnoresPaddingInAttention(ScoringGraph):
    """Attention sees every position (the mask dropped); pooling still reads real tokens only."""

    def forward(self, input_ids, attention_mask):
        ce = self.cross_encoder
        hidden = ce.model(input_ids, torch.ones_like(attention_mask)).float()
        pooled = (hidden * attention_mask[..., None]).sum(1) / attention_mask.sum(
            1, keepdim=True
        )  # (B, H) avg
        return (pooled @ ce.score.weight.float().T)[:, 0] / ce.config.temperature


def _without_last_layer(reranker: CrossEncoder) -> ScoringGraph:
    broken = copy.deepcopy(reranker)
    del broken.model.layers[-1]
    return ScoringGraph(broken)


def test_intact_graph_passes_in_fp32_and_fp16(reranker):
    fp32 = _verify(reranker, ScoringGraph(reranker))
    assert fp32.passed and fp32.error <= fp32.bound and fp32.min_cosine is None
    half = low_precision_copy(ScoringGraph(reranker), "fp16")
    assert half.cross_encoder.score.weight.dtype == torch.float32  # the head stays fp32, as in CrossEncoder
    assert torch.equal(half.cross_encoder.score.weight, reranker.score.weight)
    fp16 = _verify(reranker, half, "fp16")
    assert fp16.passed and fp16.error == pytest.approx(fp16.reference_error)  # the very same computation


@pytest.mark.parametrize(
    "breakage",
    [_other_pooling, _without_temperature, IgnoresPaddingInAttention, _without_last_layer],
    ids=["wrong-pooling", "temperature-missing", "attention-mask-dropped", "layer-missing"],
)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_broken_scoring_graph_fails(reranker, breakage, dtype):
    assert reranker.config.temperature == 0.5  # the premise of temperature-missing
    broken = breakage(reranker)
    if dtype == "fp16":
        broken = copy.deepcopy(broken).to(torch.float16)
    result = _verify(reranker, broken, dtype)
    assert not result.passed
    assert result.error > MAX_ERROR and result.error > 10 * result.bound  # not a near miss: far outside


def test_broken_onnx_scorer_fails_on_onnxruntime(reranker_export, reranker, tmp_path):
    """End to end: the graph without its temperature, exported to ONNX and checked against the reranker."""
    good = reranker_export("fp32")
    manifest = read_manifest(good, "onnx")
    metadata = {ATTENTION_KEY: reranker.config.attention}
    _export_graph(
        _without_temperature(reranker).eval(), tmp_path / MODEL_FILE, manifest.opset, metadata, SCORES
    )
    result = run_verification(tmp_path / MODEL_FILE, manifest, ScoringGraph(reranker), SMALL_VERIFY)
    assert not result.passed and result.error == pytest.approx(0.5, rel=1e-3)  # every score halved
    assert run_verification(good / MODEL_FILE, manifest, ScoringGraph(reranker), SMALL_VERIFY).passed


def test_score_error_by_hand():
    """The scale is the largest |score| of the whole set, so a score near 0 is no blow-up; the error is the
    largest absolute error over it."""
    truth = torch.tensor([4.0, -2.0, 1e-9, 0.5], dtype=torch.float64)
    near_zero_off = truth + torch.tensor([0.0, 0.0, 1e-6, 0.0], dtype=torch.float64)
    assert score_error(near_zero_off, truth) == pytest.approx(1e-6 / 4)  # per row it would be 1000
    one_off = truth + torch.tensor([0.0, 0.4, 0.0, -0.1], dtype=torch.float64)
    assert score_error(one_off, truth) == pytest.approx(0.4 / 4)
    assert score_error(truth * 0.5, truth) == pytest.approx(0.5)  # a missing temperature of 0.5
    zero = torch.zeros(3, dtype=torch.float64)
    assert score_error(zero, zero) == 0.0 and score_error(zero + 1e-3, zero) == pytest.approx(1e-3)
    # through compare: one batch of 1 (near 0) and one of 3, judged on one scale; FACTOR x PyTorch's own bound
    batches = [Batch(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), None)]
    batches.append(Batch(torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), None))
    reference = Reference([truth[2:3], truth[[0, 1, 3]]], [near_zero_off[2:3], near_zero_off[[0, 1, 3]]])
    inside = compare(batches, reference, lambda b: truth[2:3] + 0.9e-6 * FACTOR if b is batches[0] else truth[[0, 1, 3]],
                     "fp32", "test")  # fmt: skip
    assert inside.passed and inside.bound == pytest.approx(FACTOR * 1e-6 / 4)
    assert inside.error == pytest.approx(0.9 * FACTOR * 1e-6 / 4) and inside.min_cosine is None


def test_pair_batches_are_real_pairs_in_the_checkpoint_template(reranker):
    batches = pair_batches(reranker, (5, 48))
    shapes = [b.shape for b in batches]
    assert (
        shapes[0] == (1, 1)
        and shapes[1][0] == 1
        and shapes[2][0] == shapes[3][0] == 3
        and shapes[-1] == (5, 48)
    )
    right, left = batches[2], batches[3]
    lengths = right.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # mixed lengths
    assert torch.equal(lengths, left.attention_mask.sum(1))
    assert bool(right.attention_mask[:, 0].all()) and bool(left.attention_mask[:, -1].all())
    for row in range(3):  # the same tokens on either side
        n = int(lengths[row])
        assert torch.equal(right.input_ids[row, :n], left.input_ids[row, -n:])
    # the rows are the formatted pairs: the template's text is in them, and the tokens are the tokenizer's
    text = reranker.tokenizer.decode(batches[1].input_ids[0], skip_special_tokens=True)
    assert text.startswith("question:") and "passage:" in text
    assert int(batches[-1].attention_mask[0].sum()) == 48  # the long pair cut to the largest length exactly
    assert all(int(b.input_ids.max()) < TINY_VOCAB_SIZE for b in batches)
