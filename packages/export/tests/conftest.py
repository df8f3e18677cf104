"""Shared fixtures: an isolated model cache, tiny checkpoints and their exports, and hardware markers."""

from __future__ import annotations

from pathlib import Path

import pytest
from export_testing import RERANKER_CONFIG, SMALL_VERIFY

from bidir_core.checkpoint import EncoderConfig
from bidir_core.pytest_plugin import *  # noqa: F403 (the cache, hardware skips, embedded default: see there)
from bidir_core.testing import tiny_cross_encoder, tiny_encoder
from bidir_export import export_onnx


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory):
    """make_tiny_checkpoint(pooling) -> a saved tiny bidir checkpoint (Matryoshka dims 32, 16), one per pooling."""
    made: dict[str, Path] = {}

    def make(pooling: str = "avg") -> Path:
        if pooling not in made:
            folder = tmp_path_factory.mktemp(f"ckpt-{pooling}")
            tiny_encoder(EncoderConfig(pooling=pooling, matryoshka_dims=(32, 16))).save_pretrained(
                folder / "c"
            )
            made[pooling] = folder / "c"
        return made[pooling]

    return make


@pytest.fixture(scope="session")
def exported(make_tiny_checkpoint, tmp_path_factory):
    """exported(pooling, with_dims, dtype) -> (export folder, its source checkpoint); each exported once."""
    made = {}

    def make(pooling: str, with_dims: bool = False, dtype: str = "fp32"):
        key = (pooling, with_dims, dtype)
        if key not in made:
            ckpt = make_tiny_checkpoint(pooling)
            out = tmp_path_factory.mktemp("onnx") / "-".join(map(str, key))
            export_onnx(ckpt, out, dtype=dtype, with_dims=with_dims, verify_shape=SMALL_VERIFY)
            made[key] = out, ckpt
        return made[key]

    return make


# A temperature other than 1, so that a graph without it is wrong; a short max_length, so long pairs are cut.
@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory) -> Path:
    """A saved tiny reranker checkpoint (avg pooling, NeMo's template, temperature 0.5, max_length 64)."""
    return tiny_cross_encoder(RERANKER_CONFIG).save_pretrained(tmp_path_factory.mktemp("rr") / "c")


@pytest.fixture(scope="session")
def reranker_export(tiny_reranker, tmp_path_factory):
    """reranker_export(dtype) -> the tiny reranker's ONNX export folder, each dtype exported once."""
    made = {}

    def make(dtype: str = "fp32") -> Path:
        if dtype not in made:
            made[dtype] = tmp_path_factory.mktemp("rr-onnx") / dtype
            export_onnx(tiny_reranker, made[dtype], dtype=dtype, verify_shape=SMALL_VERIFY)
        return made[dtype]

    return make
