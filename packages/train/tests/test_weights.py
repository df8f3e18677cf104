"""The encoder a run trains: loaded from a checkpoint folder into (unsharded, one process) training mode, with bf16
autocast on CPU as BiEncoder's own choice, so training and the in-loop dev evaluation take the same forward."""

from __future__ import annotations

import pytest
import torch

from bidir_core.encoder import BiEncoder
from bidir_core.pooling import pool
from bidir_train import load_recipe
from bidir_train.weights import load_encoder


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_load_encoder_autocast(tiny_checkpoint, device, precision):
    cfg = load_recipe("tiny", [f"model.path={tiny_checkpoint}", f"model.precision={precision}"])
    encoder = load_encoder(cfg, device)
    assert encoder.training
    assert encoder.autocast_dtype == (
        torch.bfloat16 if precision == "bf16" and device.type == "cpu" else None
    )

    ids = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 0, 0]])
    mask = (ids != 0).long()
    emb = encoder(ids, mask, normalize=False)
    with (
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=encoder.autocast_dtype is not None),
    ):
        hidden = encoder.model(ids, mask)
    assert emb.dtype == torch.float32  # pooling stays fp32
    torch.testing.assert_close(emb.detach(), pool(hidden.float(), mask, "avg"), rtol=0, atol=0)

    plain = BiEncoder(encoder.model, encoder.tokenizer, encoder.config)(ids, mask, normalize=False)
    if encoder.autocast_dtype is None:
        assert torch.equal(plain, emb)
    else:
        assert (plain - emb).abs().max() > 1e-4  # bf16 compute is visible: the choice took effect
