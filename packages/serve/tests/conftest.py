"""Shared fixtures: an isolated model cache, tiny checkpoints (an embedder and a reranker), an ONNX export of one, and
a corpus of varied length."""

from __future__ import annotations

import pytest
import torch

from bidir_core.artifacts import OnnxManifest, checkpoint_fingerprint, write_manifest
from bidir_core.checkpoint import EncoderConfig
from bidir_core.embedding_graph import EmbeddingGraph
from bidir_core.pytest_plugin import *  # noqa: F403 (the cache, hardware skips, embedded default: see there)
from bidir_core.reranker_config import RerankerConfig
from bidir_core.testing import random_texts, tiny_cross_encoder, tiny_encoder


@pytest.fixture(scope="session")
def make_texts():
    return random_texts


@pytest.fixture(scope="session")
def encoder():
    """The tiny encoder (max_length 48, so the longest texts get truncated)."""
    return tiny_encoder(EncoderConfig(max_length=48)).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(encoder, tmp_path_factory):
    return encoder.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def reranker():
    """The tiny reranker (NeMo's template, avg pooling, max_length 48, so long pairs get their passage cut)."""
    return tiny_cross_encoder(RerankerConfig(max_length=48)).eval()


@pytest.fixture(scope="session")
def reranker_checkpoint(reranker, tmp_path_factory):
    return reranker.save_pretrained(tmp_path_factory.mktemp("reranker") / "tiny-reranker")


@pytest.fixture(scope="session")
def texts():
    return random_texts(60)


@pytest.fixture(scope="session")
def onnx_export(encoder, tiny_checkpoint, tmp_path_factory):
    """onnx_export(with_dims) -> an ONNX export folder of the tiny encoder: the artifact's graph (core's
    EmbeddingGraph) through a minimal stand-in for export-onnx, which bidir-serve must not import; the real exporter
    is tested in bidir-export and the integration tests."""
    from torch.export import Dim

    made = {}

    def make(with_dims: bool = False):
        if with_dims in made:
            return made[with_dims]
        folder = tmp_path_factory.mktemp("onnx-dims" if with_dims else "onnx")
        ids = torch.randint(3, 300, (2, 8))
        args = (ids, torch.ones_like(ids)) + ((torch.tensor([64, 16]),) if with_dims else ())
        graph = EmbeddingGraph(encoder, with_dims).eval()
        names = list(graph.input_names)
        dyn = {
            "input_ids": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC},
            "attention_mask": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC},
        }
        if with_dims:
            dyn["dimensions"] = {0: Dim.DYNAMIC}
        torch.onnx.export(
            graph,
            args,
            str(folder / "model.onnx"),
            input_names=names,
            output_names=["embeddings"],
            dynamic_shapes=dyn,
            external_data=False,
        )
        encoder.tokenizer.save_pretrained(folder)
        manifest = OnnxManifest(
            encoder=encoder.config,
            hidden_size=encoder.hidden_size,
            dtype="fp32",
            opset=18,
            source=str(tiny_checkpoint),
            source_fingerprint=checkpoint_fingerprint(tiny_checkpoint),
            inputs=tuple(names),
        )
        write_manifest(folder, manifest)
        made[with_dims] = folder
        return folder

    return make
