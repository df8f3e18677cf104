"""A float64 model computes in float64 throughout: bidir-export's verification uses it as the truth, so no step
(RMSNorm, RoPE tables, pooling) may round through fp32. fp32 and bf16 models keep their fp32 islands."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bidir_core.checkpoint import EncoderConfig
from bidir_core.testing import tiny_encoder


class FloatDtypes(TorchDispatchMode):
    """Records the dtype of every floating-point tensor an op computes. Views are left out: RoPE's inverse
    frequencies are an fp32 buffer by definition (transformers computes them in fp32), viewed, then cast up."""

    def __init__(self):
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.seen.add(t.dtype)
        return out


def _inputs():
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # left padding in row 1
    return ids, mask


def test_float64_forward_never_rounds_through_fp32():
    # cls / last find their token with an argmax over the 0/1 mask as fp32 (exact); the states stay float64
    for pooling in ("avg", "weighted_avg"):
        enc = tiny_encoder(EncoderConfig(pooling=pooling)).double()
        ids, mask = _inputs()
        with torch.no_grad(), FloatDtypes() as mode:
            out = enc(ids, mask)
        assert out.dtype == torch.float64
        assert mode.seen == {torch.float64}, (pooling, mode.seen)


def test_float64_and_fp32_agree_to_fp32_rounding():
    enc = tiny_encoder()
    ids, mask = _inputs()
    with torch.no_grad():
        fp32 = enc(ids, mask).double()
        fp64 = enc.double()(ids, mask)
    err = float((fp32 - fp64).abs().max())
    assert 0 < err < 1e-5  # different arithmetic, same function


def test_bf16_model_keeps_fp32_norm_and_rope():
    enc = tiny_encoder().to(torch.bfloat16)
    ids, mask = _inputs()
    with torch.no_grad(), FloatDtypes() as mode:
        out = enc(ids, mask)
    assert out.dtype == torch.float32 and mode.seen == {torch.bfloat16, torch.float32}
