"""The tensorrt backend: profile planning (runs everywhere) and an engine run against BiEncoder.encode (needs
tensorrt and a GPU; skips elsewhere).

The engine test builds a tiny fp32 engine itself from the test's ONNX export (a minimal stand-in for export-trt,
which bidir-serve must not import), with two profiles whose maximum batch (4) forces the backend to split batches.
Tolerance 1e-3: TensorRT picks its own fp32 kernels (TF32 is off by default for strongly typed fp32 networks, but
reductions are reordered), so a few 1e-4 of difference is rounding; a wrong mask or pooling is far larger.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidir_core import BidirError
from bidir_core.artifacts import EngineManifest, Profile, read_manifest, write_manifest
from bidir_core.tokenization import tokenize
from bidir_serve.backends.tensorrt import plan

PROFILES = (Profile((1, 1), (4, 16), (4, 16)), Profile((1, 8), (2, 64), (2, 64)))


def test_plan_picks_a_fitting_profile_or_splits():
    assert plan(PROFILES, 3, 10) == (0, 3)  # fits the first profile whole
    assert plan(PROFILES, 2, 40) == (1, 2)  # only the second takes seq 40
    assert plan(PROFILES, 9, 10) == (0, 4)  # too many rows: runs of 4 under the first
    assert plan(PROFILES, 9, 40) == (1, 2)  # runs of 2 under the second
    short = (Profile((1, 8), (2, 16), (2, 64)),)
    assert plan(short, 2, 3) == (0, 2)  # shorter than the minimum: padded up to it by the backend
    with pytest.raises(BidirError, match="sequence length 65 is longer than every engine profile's maximum"):
        plan(PROFILES, 1, 65)


@pytest.mark.tensorrt
def test_tensorrt_backend_matches_encode(onnx_export, encoder, texts, tmp_path):
    import shutil

    import tensorrt as trt

    from bidir_serve.backends import load_backend

    src = onnx_export(True)
    onnx = read_manifest(src, "onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(src / "model.onnx")), [
        parser.get_error(i) for i in range(parser.num_errors)
    ]
    config = builder.create_builder_config()
    profiles = (Profile((1, 1), (4, 16), (4, 16)), Profile((1, 8), (2, 48), (2, onnx.encoder.max_length)))
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name in ("input_ids", "attention_mask"):
            profile.set_shape(name, (p.min[0], p.min[1]), (p.opt[0], p.opt[1]), (p.max[0], p.max[1]))
        profile.set_shape("dimensions", (p.min[0],), (p.opt[0],), (p.max[0],))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None
    (tmp_path / "model.engine").write_bytes(bytes(engine))
    for name in src.iterdir():
        if name.name.startswith("tokenizer") or name.name == "special_tokens_map.json":
            shutil.copy(name, tmp_path / name.name)
    write_manifest(
        tmp_path,
        EngineManifest(
            onnx=onnx,
            precision="fp32",
            profiles=profiles,
            tensorrt_version=trt.__version__,
            gpu_name=torch.cuda.get_device_name(),
            compute_capability="{}.{}".format(*torch.cuda.get_device_capability()),
        ),
    )
    for dim in (None, 16):
        backend = load_backend(tmp_path, "auto", dim=dim)
        assert backend.name == "tensorrt"
        ids, _ = tokenize(backend.tokenizer, texts, backend.config.max_length)
        inputs = backend.prepare(ids)  # 60 rows: split into runs of 2
        assert inputs.input_ids.is_pinned() and inputs.attention_mask.is_pinned()
        got = backend.embed(inputs)
        with pytest.warns(UserWarning, match="truncated"):
            expected = encoder.encode(texts, dim=dim)
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
