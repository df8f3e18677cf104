"""The scorers of exported rerankers: OnnxRuntimeScorer (and TensorRTScorer where TensorRT and a GPU are) score
token rows of formatted pairs as CrossEncoder.predict scores the pairs, and load_backend returns them for a
reranker's export folder.

The export is core's ScoringGraph through a minimal stand-in for export-onnx (bidir-serve must not import
bidir-export), as conftest's onnx_export does for the embedder. Tolerance 1e-5 (ONNX) : the same fp32 model on CPU,
where bidir-export's verification of this graph measures ~5e-7 relative to the largest score; TensorRT 1e-3, as the
embedding engine test (its own fp32 kernels).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from bidir_core import BidirError
from bidir_core.artifacts import EngineManifest, OnnxManifest, Profile, checkpoint_fingerprint, write_manifest
from bidir_core.reranker_config import RerankerConfig
from bidir_core.scoring_graph import SCORES, ScoringGraph
from bidir_core.testing import tiny_cross_encoder
from bidir_serve.backends import OnnxRuntimeBackend, OnnxRuntimeScorer, load_backend

PAIRS = [
    ("how do i sort a list", "return a new sorted list from the items in iterable"),
    ("fox", "the quick brown fox jumps over the lazy dog " * 4),  # past max_length 48: cut
    ("a", "b"),
    ("dense retrieval", "embeddings for semantic search"),
    ("night", "passages at night"),
]


@pytest.fixture(scope="module")
def cross_encoder():
    return tiny_cross_encoder(RerankerConfig(temperature=0.5, max_length=48)).eval()


@pytest.fixture(scope="module")
def reranker_onnx(cross_encoder, tmp_path_factory):
    from torch.export import Dim

    ckpt = cross_encoder.save_pretrained(tmp_path_factory.mktemp("rr") / "ckpt")
    folder = tmp_path_factory.mktemp("rr-onnx")
    ids = torch.randint(3, 300, (2, 8))
    dynamic = {name: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for name in ScoringGraph.input_names}
    torch.onnx.export(ScoringGraph(cross_encoder).eval(), (ids, torch.ones_like(ids)), str(folder / "model.onnx"),
                      input_names=list(ScoringGraph.input_names), output_names=[SCORES], dynamic_shapes=dynamic,
                      external_data=False)  # fmt: skip
    cross_encoder.tokenizer.save_pretrained(folder)
    manifest = OnnxManifest(
        encoder=None,
        hidden_size=cross_encoder.hidden_size,
        dtype="fp32",
        opset=18,
        source=str(ckpt),
        source_fingerprint=checkpoint_fingerprint(ckpt),
        output=SCORES,
        kind="reranker",
        reranker=cross_encoder.config,
    )
    write_manifest(folder, manifest)
    return folder


def test_onnxruntime_scorer_scores_as_predict(reranker_onnx, cross_encoder):
    scorer = load_backend(reranker_onnx, "onnxruntime", device="cpu")
    assert isinstance(scorer, OnnxRuntimeScorer) and load_backend(reranker_onnx).name == "onnxruntime"  # auto
    assert scorer.kind == "reranker" and scorer.config == cross_encoder.config and scorer.precision == "fp32"
    with pytest.warns(UserWarning, match="truncated"):
        want = cross_encoder.predict(PAIRS)
    rows = cross_encoder.tokenize_pairs(PAIRS)[0]  # with the template the export carries (scorer.config)
    got = scorer.score(scorer.prepare(rows))
    assert got.dtype == np.float32 and got.shape == (len(PAIRS),)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scorer.score(scorer.prepare(rows[2:3])), want[2:3], atol=1e-5, rtol=0)


def test_a_scorer_has_no_dim_and_kinds_do_not_mix(reranker_onnx, onnx_export):
    with pytest.raises(
        BidirError, match="a reranker gives one score per pair, it has no embedding dim to cut"
    ):
        load_backend(reranker_onnx, "onnxruntime", dim=16)
    scorer = load_backend(reranker_onnx, device="cpu")
    with pytest.raises(
        BidirError, match=r"reranker: a reranker has no embedding dim; it scores \(query, passage\) pairs$"
    ):
        _ = scorer.dim
    with pytest.raises(
        BidirError, match="model is kind reranker; the onnxruntime embedding backend runs kind embedder"
    ):
        OnnxRuntimeBackend(reranker_onnx)
    with pytest.raises(BidirError, match="model is kind embedder; the onnxruntime scorer runs kind reranker"):
        OnnxRuntimeScorer(onnx_export(False))
    assert load_backend(onnx_export(False), device="cpu").kind == "embedder"


@pytest.mark.tensorrt
def test_tensorrt_scorer_scores_as_predict(reranker_onnx, cross_encoder, tmp_path):
    import tensorrt as trt

    from bidir_serve.backends import TensorRTScorer

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(reranker_onnx / "model.onnx")), parser.get_error(0)
    config = builder.create_builder_config()
    profiles = (Profile((1, 1), (2, 16), (2, 48)),)  # batch 2 at most: 5 pairs run in 3 chunks
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name in ScoringGraph.input_names:
            profile.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None
    (tmp_path / "model.engine").write_bytes(bytes(engine))
    for path in reranker_onnx.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy(path, tmp_path / path.name)
    from bidir_core.artifacts import read_manifest

    write_manifest(tmp_path, EngineManifest(read_manifest(reranker_onnx, "onnx"), "fp32", profiles, trt.__version__,
                                            torch.cuda.get_device_name(),
                                            "{}.{}".format(*torch.cuda.get_device_capability())))  # fmt: skip
    scorer = load_backend(tmp_path)
    assert isinstance(scorer, TensorRTScorer) and scorer.kind == "reranker"
    with pytest.warns(UserWarning, match="truncated"):
        want = cross_encoder.predict(PAIRS)
    got = scorer.score(scorer.prepare(cross_encoder.tokenize_pairs(PAIRS)[0]))
    assert got.shape == (len(PAIRS),)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
