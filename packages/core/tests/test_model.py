"""bidir_core.model's check of the weights read against the model's config: a weight of the wrong shape, a missing
weight and an unexpected one are named."""

from __future__ import annotations

import pytest
import torch
from errors_testing import edit_json, load_error, one_line_error
from safetensors.torch import load_file, save_file


@pytest.mark.parametrize(
    ("field", "value", "weight"),
    [
        ("hidden_size", 96, "embed_tokens.weight"),
        ("intermediate_size", 96, "layers.0.mlp.gate_proj.weight"),
        ("vocab_size", 300, "embed_tokens.weight"),
    ],
)
def test_shape_mismatch_names_the_weight(hf_copy, field, value, weight):
    edit_json(hf_copy / "config.json", **{field: value})
    message = one_line_error(load_error(hf_copy), weight, "shape", str(hf_copy / "model.safetensors"))
    assert str(value) in message  # the shape config.json implies


def test_missing_weights_named(hf_copy):
    path = hf_copy / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    one_line_error(load_error(hf_copy), "missing", "layers.1.mlp.up_proj.weight")


def test_fewer_layers_in_weights_than_in_config(hf_copy):
    edit_json(hf_copy / "config.json", num_hidden_layers=3)
    one_line_error(load_error(hf_copy), "missing", "layers.2.")


def test_unexpected_weights_named(hf_copy):
    path = hf_copy / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path, metadata={"format": "pt"})
    one_line_error(load_error(hf_copy), "unexpected", "layers.0.self_attn.extra.weight")
