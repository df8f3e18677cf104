"""The model on CUDA: same results as on CPU (fp32), close in bf16, and no NaN from padding-only rows."""

from __future__ import annotations

import pytest
import torch

from bidir_core import EncoderConfig
from bidir_core.batching import pad_batch
from bidir_core.testing import tiny_encoder

pytestmark = pytest.mark.gpu

TEXTS = ["a short one", "the quick brown fox jumps over the lazy dog, twice over", "embeddings", ""]


def _batch(padding_side: str):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (40, 17, 5)] + [
        []
    ]  # last: padding only
    return pad_batch(rows, pad_id=0, padding_side=padding_side)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cuda_fp32_matches_cpu(padding_side, monkeypatch):
    # CUDA matmuls may use TF32 when allowed; 1e-4 covers fp32 kernels with a different reduction order.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    encoder = tiny_encoder()
    ids, mask = _batch(padding_side)
    with torch.no_grad():
        cpu = encoder(ids, mask)
        gpu = encoder.to("cuda")(ids.cuda(), mask.cuda()).cpu()
    assert torch.isfinite(gpu).all()
    assert torch.allclose(gpu, cpu, atol=1e-4)


@pytest.mark.parametrize("pooling", ["avg", "cls", "last", "weighted_avg"])
def test_cuda_bf16_close_to_fp32(pooling):
    encoder = tiny_encoder(EncoderConfig(pooling=pooling))
    want = encoder.encode(TEXTS[:3])
    encoder = encoder.to(device="cuda", dtype=torch.bfloat16)
    got = encoder.encode(TEXTS[:3])
    # bf16 keeps ~3 significant digits; on normalized vectors cosine >= 0.99 is the parity that matters.
    assert (got * want).sum(axis=1).min() > 0.99


def test_cuda_encode_batch_invariance_bf16():
    encoder = tiny_encoder().to(device="cuda", dtype=torch.bfloat16)
    together = encoder.encode(TEXTS[:3], batch_size=3)
    for i, text in enumerate(TEXTS[:3]):
        alone = encoder.encode([text])[0]
        assert float(alone @ together[i]) > 0.999
