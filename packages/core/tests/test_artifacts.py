"""The ONNX / TensorRT manifests round-trip through their one reader, and bad manifests name what is wrong."""

import json

import pytest
import torch

from bidir_core import BidirError, EncoderConfig
from bidir_core.artifacts import (
    EngineManifest,
    OnnxManifest,
    Profile,
    Verification,
    artifact_files,
    checkpoint_fingerprint,
    export_source,
    find_manifest,
    read_manifest,
    write_manifest,
)
from bidir_core.reranker_config import RerankerConfig
from bidir_core.testing import tiny_encoder


def _onnx_manifest(**kw):
    fields = dict(
        encoder=EncoderConfig(pooling="last", matryoshka_dims=(32, 16)),
        hidden_size=64,
        dtype="bf16",
        opset=23,
        source="/ckpt",
        source_fingerprint="sha256:00",
        inputs=("input_ids", "attention_mask", "dimensions"),
        node_count=12,
        op_histogram={"MatMul": 8, "Attention": 2},
        verification=Verification(True, 1e-6, 0.99999, "max_abs_diff <= 1e-4", ((1, 1), (3, 7)), "ort"),
    )
    return OnnxManifest(**{**fields, **kw})


def test_onnx_manifest_round_trips(tmp_path):
    manifest = _onnx_manifest()
    (tmp_path / "model.onnx").write_bytes(b"")
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path, "onnx") == manifest
    assert manifest.with_dims


def test_engine_manifest_round_trips(tmp_path):
    manifest = EngineManifest(
        onnx=_onnx_manifest(verification=None),
        precision="bf16",
        profiles=(Profile((1, 1), (32, 128), (64, 512)), Profile((1, 1), (1, 2048), (4, 4096))),
        tensorrt_version="10.9.0",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
    )
    (tmp_path / "model.engine").write_bytes(b"")
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert manifest.profiles[0].fits(64, 512) and not manifest.profiles[0].fits(65, 2)


def _reranker_manifest(**kw):
    fields = dict(
        encoder=None,
        reranker=RerankerConfig(
            template="q: {query}\np: {passage}\nrelevant:", pooling="last", attention="causal"
        ),
        kind="reranker",
        inputs=("input_ids", "attention_mask"),
        output="scores",
    )
    return _onnx_manifest(**{**fields, **kw})


def test_reranker_manifests_round_trip_and_old_ones_read_as_embedders(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "model.engine").write_bytes(b"")
    manifest = _reranker_manifest()
    write_manifest(tmp_path, manifest)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["kind"] == "onnx" and raw["model_kind"] == "reranker" and raw["encoder"] is None
    assert raw["reranker"]["template"] == "q: {query}\np: {passage}\nrelevant:"
    read = read_manifest(tmp_path, "onnx")
    assert read == manifest and read.settings == manifest.reranker and read.settings.attention == "causal"
    engine = EngineManifest(manifest, "fp16", (Profile((1, 1), (2, 8), (4, 16)),), "10.9.0", "H100", "9.0")
    write_manifest(tmp_path, engine)
    assert read_manifest(tmp_path, "tensorrt") == engine and engine.kind == "reranker"
    # an embedder's manifest is written as before kinds existed, and such a manifest reads as an embedder
    write_manifest(tmp_path, _onnx_manifest())
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert "model_kind" not in raw and "reranker" not in raw
    embedder = read_manifest(tmp_path)
    assert embedder.kind == "embedder" and embedder.settings == embedder.encoder and embedder.reranker is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kind": "classifier"}, "kind must be one of embedder, reranker"),
        ({"encoder": EncoderConfig()}, "a reranker manifest has reranker settings and no encoder settings"),
        ({"reranker": None}, "a reranker manifest has reranker settings"),
        ({"output": "embeddings"}, "a reranker graph takes input_ids, attention_mask and outputs scores"),
        ({"inputs": ("input_ids", "attention_mask", "dimensions")}, "outputs scores"),
    ],
)
def test_bad_reranker_manifests(fields, message):
    with pytest.raises(BidirError, match=message):
        _reranker_manifest(**fields)


def test_bad_manifests(tmp_path):
    with pytest.raises(BidirError, match="no manifest.json"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, _onnx_manifest())
    with pytest.raises(BidirError, match="model.onnx, which is missing"):
        read_manifest(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(BidirError, match="is a onnx artifact, expected tensorrt"):
        read_manifest(tmp_path, "tensorrt")
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for key, value, message in [
        ("format_version", 99, "format_version 99"),
        ("dtype", "int4", "dtype must be one of"),
        ("surprise", 1, "unexpected keyword argument 'surprise'"),
    ]:
        (tmp_path / "manifest.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(BidirError, match=message):
            read_manifest(tmp_path)
    del raw["hidden_size"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BidirError, match="hidden_size"):
        read_manifest(tmp_path)


def test_find_manifest_and_export_source(tmp_path):
    """An export folder gives its manifest, anything else None; the export's source is refused once it changed."""
    encoder = tiny_encoder()
    ckpt = encoder.save_pretrained(tmp_path / "ckpt")
    assert find_manifest(ckpt) is None and find_manifest("smollm2-135m-not-a-folder") is None
    export = tmp_path / "onnx"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"")
    manifest = _onnx_manifest(source=str(ckpt), source_fingerprint=checkpoint_fingerprint(ckpt))
    write_manifest(export, manifest)
    assert find_manifest(export, "onnx") == manifest
    with pytest.raises(BidirError, match="expected tensorrt"):
        find_manifest(export, "tensorrt")
    assert artifact_files(manifest) >= {"manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json"}
    assert export_source(manifest) == ckpt
    tiny_encoder(seed=1).save_pretrained(ckpt, overwrite=True)
    with pytest.raises(BidirError, match=r"^m.json: source .* has changed since the export"):
        export_source(manifest, where="m.json")


def test_fingerprint_follows_the_weights(tmp_path):
    encoder = tiny_encoder()
    encoder.save_pretrained(tmp_path / "a")
    encoder.save_pretrained(tmp_path / "b")
    assert checkpoint_fingerprint(tmp_path / "a") == checkpoint_fingerprint(tmp_path / "b")
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    encoder.save_pretrained(tmp_path / "c")
    assert checkpoint_fingerprint(tmp_path / "a") != checkpoint_fingerprint(tmp_path / "c")


def test_fingerprint_of_a_gguf_file_follows_its_bytes(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF one")
    b.write_bytes(b"GGUF two")
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(b)
    b.write_bytes(b"GGUF one")
    assert (
        checkpoint_fingerprint(a)
        == checkpoint_fingerprint(tmp_path / "b.gguf")
        != checkpoint_fingerprint(tmp_path)
    )
