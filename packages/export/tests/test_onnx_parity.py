"""onnxruntime runs the exported graph like PyTorch runs BiEncoder.forward, on shapes the export never saw.

Tolerances: fp32 1e-5 here (CPU onnxruntime and PyTorch run the same fp32 math, ~3e-7 observed on the tiny model;
the export's own check allows 1e-4 for long sequences on big models). fp16: per-row cosine >= 0.999 against the
fp32 PyTorch model, the export's rule for reduced precision.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from export_testing import padded_inputs, run_onnx

from bidir_core import POOLING_STRATEGIES, BiEncoder
from bidir_core.artifacts import read_manifest
from bidir_core.testing import TINY_VOCAB_SIZE
from bidir_export.onnx_export import NotVerifiable, onnxruntime_session

ATOL = 1e-5


@functools.lru_cache(maxsize=8)
def _encoder(ckpt) -> BiEncoder:
    return BiEncoder.from_pretrained(ckpt).eval()


def _reference(ckpt, ids, mask, dims=None) -> torch.Tensor:
    """BiEncoder.forward, row by row for dims: the Matryoshka prefix, then zeros to the hidden width."""
    encoder = _encoder(ckpt)
    with torch.no_grad():
        if dims is None:
            return encoder(ids, mask)
        rows = [encoder(ids[i : i + 1], mask[i : i + 1], dim=int(d)) for i, d in enumerate(dims)]
    return torch.cat([F.pad(r, (0, encoder.hidden_size - r.shape[1])) for r in rows])


@pytest.mark.parametrize("with_dims", [False, True], ids=["no-dims", "dims"])
@pytest.mark.parametrize("pooling", POOLING_STRATEGIES)
def test_fp32_parity_on_new_shapes(exported, pooling, with_dims):
    out, ckpt = exported(pooling, with_dims)
    manifest = read_manifest(out, "onnx")
    assert manifest.verification.passed and manifest.verification.max_abs_diff <= 1e-4
    # The export example is 2 x 8: check 1 x 1, a wider batch, and right and left padding at a new length.
    cases = [(1, 1, "right"), (5, 23, "right"), (4, 19, "left"), (1, 64, "right")]
    for batch, seq, side in cases:
        ids, mask = padded_inputs(TINY_VOCAB_SIZE, batch, seq, side)
        dims = torch.tensor([(64, 32, 16, 7)[i % 4] for i in range(batch)]) if with_dims else None
        got = run_onnx(out, ids, mask, dims)
        want = _reference(ckpt, ids, mask, dims)
        assert got.shape == (batch, 64)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        if with_dims:  # the tail past each row's dimension is zero, the prefix unit length
            for row, d in enumerate(dims.tolist()):
                assert not got[row, d:].any()
                assert abs(float(got[row, :d].norm()) - 1.0) < 1e-5


def test_padding_side_does_not_matter(exported):
    out, _ = exported("last")
    ids_r, mask_r = padded_inputs(TINY_VOCAB_SIZE, 4, 15, "right")
    # The same texts left-padded: shift each row's real tokens to the end.
    ids_l, mask_l = torch.zeros_like(ids_r), torch.zeros_like(mask_r)
    for row in range(4):
        n = int(mask_r[row].sum())
        ids_l[row, 15 - n :], mask_l[row, 15 - n :] = ids_r[row, :n], 1
    torch.testing.assert_close(run_onnx(out, ids_l, mask_l), run_onnx(out, ids_r, mask_r), atol=ATOL, rtol=0)


def test_bidirectionality_survives_export(exported):
    # cls pooling reads the first token only: in a causal model it could not see the last token.
    out, _ = exported("cls")
    ids, mask = padded_inputs(TINY_VOCAB_SIZE, 1, 12, "right")
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % TINY_VOCAB_SIZE
    before, after = run_onnx(out, ids, mask), run_onnx(out, changed, mask)
    assert (before - after).abs().max() > 1e-3


def test_fp16_parity(exported, make_tiny_checkpoint):
    out, ckpt = exported("avg", True, "fp16")
    manifest = read_manifest(out, "onnx")
    assert manifest.dtype == "fp16" and manifest.verification.passed
    assert manifest.verification.min_cosine >= 0.999
    ids, mask = padded_inputs(TINY_VOCAB_SIZE, 3, 21, "left")
    dims = torch.tensor([64, 32, 16])
    got, want = run_onnx(out, ids, mask, dims), _reference(ckpt, ids, mask, dims)
    assert F.cosine_similarity(got, want, dim=-1).min() >= 0.999
    assert (got - want).abs().max() > 0  # really reduced precision, not an fp32 graph


def test_bf16_export_is_written_and_says_why_it_is_not_verified(exported):
    # onnxruntime's CPU provider has no bf16 MatMul: the export is written (for TensorRT / onnxruntime-gpu) with
    # no verification recorded, and running it here says what is missing.
    out, _ = exported("avg", False, "bf16")
    manifest = read_manifest(out, "onnx")
    assert manifest.dtype == "bf16" and manifest.verification is None
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: the bf16 graph runs")
    with pytest.raises(NotVerifiable, match="no bf16"):
        onnxruntime_session(out / manifest.model_file)
