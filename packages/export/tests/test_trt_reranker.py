"""export-trt of a reranker: the per-profile verification batches (real pairs) and the checks before any work run
everywhere; the engine build and its scores need TensorRT and a GPU (marked `tensorrt`, skipped here with the
reason).

Engine tolerance: the export's rule for scores (bidir_export.verification), which build_engine applies; on pairs
the verification did not use, the engine's scores are held to the same bound against CrossEncoder.predict.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_testing import RERANKER_CONFIG

from bidir_core import BidirError
from bidir_core.artifacts import Profile, read_manifest
from bidir_core.batching import pad_batch
from bidir_core.cross_encoder import CrossEncoder
from bidir_export import build_engine
from bidir_export.profiles import parse_profile
from bidir_export.tensorrt_build import profile_batches
from bidir_export.verification import pair_batches

PROFILES = (Profile((1, 1), (4, 32), (8, 64)), Profile((2, 16), (2, 32), (4, 64)))


def test_each_profile_is_verified_on_pairs_that_fit_it(tiny_reranker):
    ce = CrossEncoder.from_pretrained(tiny_reranker).eval()
    batches, profile_of = profile_batches(PROFILES, lambda largest, seed: pair_batches(ce, largest))
    assert len(batches) == len(profile_of)
    for batch, index in zip(batches, profile_of, strict=True):
        assert PROFILES[index].fits(*batch.shape)
    for index, profile in enumerate(PROFILES):  # each profile's max and min shapes are among its batches
        shapes = {b.shape for b, i in zip(batches, profile_of, strict=True) if i == index}
        assert profile.max in shapes and profile.min in shapes
    assert (1, 1) in {b.shape for b in batches}


def test_a_profile_past_the_rerankers_max_length_is_refused_first(tiny_reranker, tmp_path, monkeypatch):
    import bidir_export.tensorrt_build as trt_build

    monkeypatch.setattr(trt_build, "export_onnx", lambda *a, **k: pytest.fail("exported before validating"))
    with pytest.raises(BidirError, match=f"max_length {RERANKER_CONFIG.max_length}"):
        build_engine(tiny_reranker, tmp_path / "e", profiles=[parse_profile("1x1,1x8,2x65")])
    assert not (tmp_path / "e").exists()


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_reranker_engine_scores_as_predict(tiny_reranker, reranker_export, tmp_path, precision):
    import tensorrt as trt

    from bidir_export.tensorrt_build import EngineRunner

    source = tiny_reranker if precision == "fp16" else reranker_export("fp32")  # a checkpoint, an ONNX export
    manifest = build_engine(
        source, tmp_path / "engine", precision=precision, profiles=PROFILES, workspace_gb=1
    )
    assert read_manifest(tmp_path / "engine", "tensorrt") == manifest
    assert manifest.kind == "reranker" and manifest.onnx.reranker == RERANKER_CONFIG
    result = manifest.verification
    assert result.passed and result.min_cosine is None and result.error <= result.bound

    ce = CrossEncoder.from_pretrained(tiny_reranker).eval()
    pairs = [
        ("how do i sort a list", "sorted(items) returns a new list"),
        ("fox", "the quick brown fox"),
        ("a", "b"),
    ]
    want = ce.predict(pairs)
    runner = EngineRunner(trt, (tmp_path / "engine" / "model.engine").read_bytes(), "scores")
    feeds = dict(
        zip(("input_ids", "attention_mask"), pad_batch(ce.tokenize_pairs(pairs)[0], 0, "left"), strict=True)
    )
    got = runner(feeds, profile=0).cpu().numpy()
    assert got.shape == (3,) and np.abs(got - want).max() <= result.bound * np.abs(want).max() + 1e-6
    assert torch.isfinite(torch.from_numpy(got)).all()
