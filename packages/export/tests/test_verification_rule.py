"""The verification rule (bidir_export.verification): its bound by hand, and that it catches real breakage.

Each broken artifact below is the tiny model's embedding path with one fault, judged against the intact model:
a graph that ignores the padding mask in attention, one that lost a layer, one that pools differently (weighted_avg
for avg: the closest of the pooling strategies), and an fp16 export whose activations overflow. All must fail; the
intact fp32 and fp16 graphs must pass. One fault also goes through a real ONNX export and onnxruntime.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from export_testing import SMALL_VERIFY

from bidir_core.artifacts import read_manifest
from bidir_core.embedding_graph import EmbeddingGraph
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.pooling import pool
from bidir_export import export_onnx
from bidir_export.onnx_export import ATTENTION_KEY, MODEL_FILE, _export_graph, run_verification
from bidir_export.verification import (
    FACTOR,
    MAX_ERROR,
    UNIT_ROUNDOFF,
    Batch,
    Reference,
    compare,
    reference_outputs,
    verification_batches,
)


def _batches(encoder: BiEncoder) -> list[Batch]:
    return verification_batches(encoder.model.config.vocab_size, SMALL_VERIFY)


def _verify(encoder: BiEncoder, artifact: torch.nn.Module, dtype: str = "fp32"):
    """artifact (a module taking input_ids, attention_mask) judged against encoder by the rule."""
    batches = _batches(encoder)
    expected = reference_outputs(EmbeddingGraph(encoder), batches, dtype)

    def run(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return artifact(batch.input_ids, batch.attention_mask)

    return compare(batches, expected, run, dtype, "torch (test)")


class IgnoresPaddingInAttention(torch.nn.Module):
    """Attention sees every position (the mask dropped); pooling still reads real tokens only."""

    def __init__(self, encoder: BiEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder.model(input_ids, torch.ones_like(attention_mask))
        return F.normalize(pool(hidden, attention_mask, self.encoder.config.pooling), dim=-1)


def _without_last_layer(encoder: BiEncoder) -> EmbeddingGraph:
    broken = copy.deepcopy(encoder)
    del broken.model.layers[-1]
    return EmbeddingGraph(broken)


def _other_pooling(encoder: BiEncoder) -> EmbeddingGraph:
    broken = copy.deepcopy(encoder)
    broken.config = dataclasses.replace(encoder.config, pooling="weighted_avg")
    return EmbeddingGraph(broken)


@pytest.fixture(scope="module")
def encoder(make_tiny_checkpoint) -> BiEncoder:
    return BiEncoder.from_pretrained(make_tiny_checkpoint("avg")).eval()


def test_intact_graph_passes_in_fp32_and_fp16(encoder):
    fp32 = _verify(encoder, EmbeddingGraph(encoder))
    assert fp32.passed and fp32.error <= fp32.bound
    half = copy.deepcopy(encoder).to(torch.float16)
    fp16 = _verify(encoder, EmbeddingGraph(half), "fp16")
    assert fp16.passed and fp16.error == pytest.approx(fp16.reference_error)  # the very same computation


@pytest.mark.parametrize(
    "breakage",
    [IgnoresPaddingInAttention, _without_last_layer, _other_pooling],
    ids=["attention-mask-dropped", "layer-missing", "wrong-pooling"],
)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_broken_graph_fails(encoder, breakage, dtype):
    broken = breakage(encoder)
    if dtype == "fp16":
        broken = copy.deepcopy(broken).to(torch.float16)
    result = _verify(encoder, broken, dtype)
    assert not result.passed
    assert result.error > 10 * result.bound  # not a near miss: far outside


def test_fp16_overflow_fails_and_writes_nothing(tmp_path):
    """A model whose residual stream exceeds fp16's 65504: PyTorch fp16 and the fp16 export give inf/NaN."""
    from bidir_core.testing import tiny_encoder

    enc = tiny_encoder()
    with torch.no_grad():
        for layer in enc.model.layers:
            layer.mlp.down_proj.weight.mul_(3e4)
    ckpt = tmp_path / "hot"
    enc.save_pretrained(ckpt)
    loaded = BiEncoder.from_pretrained(ckpt).eval()
    batch = _batches(loaded)[-1]
    with torch.no_grad():  # the premise: finite in fp32, not in fp16
        assert torch.isfinite(loaded(batch.input_ids, batch.attention_mask)).all()
        half = copy.deepcopy(loaded).to(torch.float16)
        assert not torch.isfinite(half(batch.input_ids, batch.attention_mask)).all()
    out = tmp_path / "onnx"
    with pytest.raises(BidirError, match="not finite"):
        export_onnx(ckpt, out, dtype="fp16", verify_shape=SMALL_VERIFY)
    assert not out.exists()
    export_onnx(ckpt, tmp_path / "fp32", verify_shape=SMALL_VERIFY)  # the same model in fp32 verifies


def test_broken_onnx_graph_fails_on_onnxruntime(exported, make_tiny_checkpoint, tmp_path):
    """End to end: an ONNX graph exported from the model without its last layer, checked against the model."""
    good, ckpt = exported("avg")
    manifest = read_manifest(good, "onnx")
    encoder = BiEncoder.from_pretrained(ckpt).eval()
    metadata = {ATTENTION_KEY: encoder.config.attention}
    _export_graph(_without_last_layer(encoder).eval(), tmp_path / MODEL_FILE, manifest.opset, metadata)
    result = run_verification(tmp_path / MODEL_FILE, manifest, EmbeddingGraph(encoder), SMALL_VERIFY)
    assert not result.passed and result.error > 10 * result.bound
    intact = run_verification(good / MODEL_FILE, manifest, EmbeddingGraph(encoder), SMALL_VERIFY)
    assert intact.passed


def test_bound_by_hand():
    """Two rows; the truth, PyTorch's own run and the artifact chosen so every figure is known exactly."""
    batch = Batch(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), None)
    truth = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)  # row norms 5 and 1
    same = truth + torch.tensor([[0.0, 5e-6], [0.0, 0.0]], dtype=torch.float64)  # row errors 1e-6, 0
    reference = Reference(float64=[truth], same_dtype=[same])

    def artifact(err):
        return lambda _b: truth + torch.tensor([[0.0, 0.0], [err, 0.0]], dtype=torch.float64)

    bound = FACTOR * 1e-6
    inside = compare([batch], reference, artifact(0.99 * bound), "fp32", "test")
    assert (
        inside.passed
        and inside.bound == pytest.approx(bound)
        and inside.reference_error == pytest.approx(1e-6)
    )
    assert inside.error == pytest.approx(0.99 * bound) and inside.max_abs_diff == pytest.approx(0.99 * bound)
    assert not compare([batch], reference, artifact(1.01 * bound), "fp32", "test").passed
    # PyTorch exact: the floor is the unit roundoff
    exact = compare([batch], Reference([truth], [truth]), artifact(0.0), "fp32", "test")
    assert exact.bound == pytest.approx(FACTOR * UNIT_ROUNDOFF["fp32"])
    # a precision that is far off by itself is capped at MAX_ERROR: a 0.12 error never passes
    lossy = Reference([truth], [truth + torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)])  # 0.2
    capped = compare([batch], lossy, artifact(0.12), "bf16", "test")
    assert capped.bound == MAX_ERROR and not capped.passed
    nan = compare([batch], reference, lambda _b: torch.full((2, 2), float("nan")), "fp32", "test")
    assert not nan.passed and nan.error is None and nan.max_abs_diff is None
