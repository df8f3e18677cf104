"""The export folder is complete: manifest fields, the tokenizer, a clean graph, and the manifest round-trips."""

from __future__ import annotations

import onnx
import pytest
from export_testing import SMALL_VERIFY
from transformers import AutoTokenizer

from bidir_core import BiEncoder
from bidir_core.artifacts import OnnxManifest, checkpoint_fingerprint, read_manifest
from bidir_core.testing import tiny_config
from bidir_export import export_onnx, verify_export
from bidir_export.cli import onnx_main
from bidir_export.verification import tolerance_rule


def test_manifest_is_complete_and_round_trips(exported):
    out, ckpt = exported("last", True)
    manifest = read_manifest(out, "onnx")
    assert isinstance(manifest, OnnxManifest)
    encoder = BiEncoder.from_pretrained(ckpt)
    assert manifest.encoder == encoder.config and manifest.encoder.matryoshka_dims == (32, 16)
    assert (manifest.hidden_size, manifest.dtype, manifest.opset) == (64, "fp32", 23)
    assert (
        manifest.inputs == ("input_ids", "attention_mask", "dimensions") and manifest.output == "embeddings"
    )
    assert manifest.source == str(ckpt.absolute())
    assert manifest.source_fingerprint == checkpoint_fingerprint(ckpt)
    v = manifest.verification
    assert v.passed and v.runtime.startswith("onnxruntime") and v.tolerance == tolerance_rule("fp32")
    assert (1, 1) in v.shapes and SMALL_VERIFY in v.shapes and 0 <= v.max_abs_diff <= 1e-4 <= v.min_cosine
    assert v.reference_error > 0 and 0 < v.error <= v.bound

    graph = onnx.load(str(out / "model.onnx")).graph
    assert manifest.node_count == len(graph.node) == sum(manifest.op_histogram.values())
    # One fused Attention node per layer, and no decomposed softmax attention left over.
    assert manifest.op_histogram["Attention"] == tiny_config().num_hidden_layers
    assert "Softmax" not in manifest.op_histogram
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
        "dimensions": ["batch"],
    }

    # The folder carries a tokenizer that tokenizes like the checkpoint's.
    texts = ["query: how do i sort a list", "ünïcode ✓"]
    assert AutoTokenizer.from_pretrained(out)(texts)["input_ids"] == encoder.tokenizer(texts)["input_ids"]


def test_older_opset_spells_attention_out_and_still_verifies(make_tiny_checkpoint, tmp_path):
    manifest = export_onnx(make_tiny_checkpoint("avg"), tmp_path / "o18", opset=18, verify_shape=SMALL_VERIFY)
    assert manifest.opset == 18 and "Attention" not in manifest.op_histogram
    assert manifest.op_histogram.get("Softmax", 0) >= tiny_config().num_hidden_layers
    assert manifest.verification.passed
    assert read_manifest(tmp_path / "o18") == manifest


def test_verify_only_rechecks_and_updates_the_manifest(exported, tmp_path, capsys):
    import shutil

    out, _ = exported("avg")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert onnx_main(["--verify-only", str(copy), "--verify-shape", "2x9"]) == 0
    manifest = read_manifest(copy)
    assert manifest.verification.passed and (2, 9) in manifest.verification.shapes
    assert "verification passed" in capsys.readouterr().err


def test_verify_only_notices_a_changed_source(make_tiny_checkpoint, tmp_path):
    import shutil

    from bidir_core import BidirError
    from bidir_core.checkpoint import EncoderConfig
    from bidir_core.testing import tiny_encoder

    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_tiny_checkpoint("avg"), ckpt)
    export_onnx(ckpt, tmp_path / "onnx", verify=False)
    assert read_manifest(tmp_path / "onnx").verification is None
    tiny_encoder(EncoderConfig(), seed=1).save_pretrained(ckpt, overwrite=True)  # other weights, same place
    with pytest.raises(BidirError, match="has changed since the export"):
        verify_export(tmp_path / "onnx")


def test_large_models_use_external_data(make_tiny_checkpoint, tmp_path, monkeypatch):
    # The 2 GB switch, lowered so the tiny model takes the large-model path: weights next to the graph, the
    # checker, shape inference and onnxruntime still find them.
    import bidir_export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    manifest = export_onnx(make_tiny_checkpoint("avg"), tmp_path / "big", verify_shape=SMALL_VERIFY)
    files = {p.name: p.stat().st_size for p in (tmp_path / "big").iterdir()}
    data = [name for name in files if name.startswith("model.onnx") and name != "model.onnx"]
    assert len(data) == 1
    graph = onnx.load(str(tmp_path / "big" / "model.onnx"), load_external_data=False).graph
    embed = next(i for i in graph.initializer if "embed_tokens" in i.name)
    assert embed.data_location == onnx.TensorProto.EXTERNAL and files[data[0]] >= 320 * 64 * 4
    assert manifest.verification.passed
