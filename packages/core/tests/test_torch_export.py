"""torch.export of the model and the encoder with dynamic batch and sequence dimensions (the
forward has no .item() and no branch on tensor values, so it exports cleanly).

Tolerance 1e-5: the exported program runs the same fp32 ops as eager on CPU; any larger difference means the export
specialized something to the example shape (a baked-in length, position table or mask).
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

from bidir_core import BiEncoder, LlamaBidirectionalModel
from bidir_core.checkpoint import EncoderConfig
from bidir_core.testing import TINY_VOCAB_SIZE, tiny_config, tiny_encoder, tiny_model

ATOL = 1e-5


def _example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINY_VOCAB_SIZE, (2, 8), generator=g)
    return ids, torch.ones(2, 8, dtype=torch.long)


def _other_inputs(batch: int = 3, seq: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    """A different shape from the example, with a right-padded and a left-padded row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, TINY_VOCAB_SIZE, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, max(1, 2 * seq // 3) :] = 0  # right padding
    if batch > 2:
        mask[2, : seq // 3] = 0  # left padding
    ids[mask == 0] = 0
    return ids, mask


def _dynamic_shapes():
    # Dim.DYNAMIC rather than named Dims with ranges: older torch (2.11) cannot prove some always-true stride
    # guards of SDPA over a bounded range and rejects the named Dims, while the exported program is the same.
    return {"input_ids": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, "attention_mask": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}}


def _export_and_compare(module: torch.nn.Module, *shapes: tuple[int, int]) -> list[torch.Tensor]:
    """Export on the 2x8 example, run on other shapes, compare with eager; returns the exported outputs."""
    program = export(module, _example_inputs(), dynamic_shapes=_dynamic_shapes())
    exported = program.module()
    outputs = []
    for batch, seq in shapes:
        inputs = _other_inputs(batch, seq)
        with torch.no_grad():
            expected = module(*inputs)
            got = exported(*inputs)
        assert got.shape == expected.shape
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        outputs.append(got)
    return outputs


def test_export_model_with_dynamic_batch_and_sequence():
    model = tiny_model()
    _export_and_compare(model, (3, 13), (5, 4))


@pytest.mark.parametrize("pooling", ["avg", "last"])
def test_export_encoder_with_dynamic_batch_and_sequence(pooling):
    encoder = tiny_encoder(EncoderConfig(pooling=pooling))
    assert isinstance(encoder, BiEncoder)
    out, _ = _export_and_compare(encoder, (3, 13), (4, 3))
    assert out.shape == (3, encoder.hidden_size)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)  # normalize=True default


def test_export_dynamic_rope_model():
    # max_position_embeddings=8 so the 13-token run is past it and dynamic NTK actually rescales the frequencies;
    # the example (8 tokens) is not, so an export that baked in the example's frequencies would differ.
    config = tiny_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8)
    model = tiny_model(config)
    assert model.rotary_emb.rope_type == "dynamic"

    # The dynamic rope path is really taken: beyond max_position_embeddings it differs from default rope with
    # the same weights; within it the two agree.
    plain = LlamaBidirectionalModel.from_state_dict(
        tiny_config(max_position_embeddings=8), model.state_dict()
    )
    with torch.no_grad():
        long_inputs, short_inputs = _other_inputs(3, 13), _other_inputs(2, 6)
        assert not torch.allclose(model(*long_inputs), plain(*long_inputs), atol=1e-3)
        torch.testing.assert_close(model(*short_inputs), plain(*short_inputs), atol=ATOL, rtol=0)

    _export_and_compare(model, (3, 13), (2, 6))
