"""bidir_export.onnx_export: a source that is no checkpoint and bad options are refused in one line before anything
is exported; an export that fails its verification writes nothing; verify_export refuses a graph that does not
match its manifest."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from export_testing import leftovers

from bidir_core import BidirError
from bidir_export import export_onnx, verify_export
from bidir_export.cli import onnx_main


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(BidirError, match="no config.json"):
        export_onnx(tmp_path / "notes", tmp_path / "out")
    assert onnx_main([str(tmp_path / "notes"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "export-onnx: error:" in err and "notes" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_source_and_bad_options(tmp_path, make_tiny_checkpoint):
    with pytest.raises(BidirError, match="no such file or folder"):
        export_onnx(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(BidirError, match="opset must be"):
        export_onnx(make_tiny_checkpoint("avg"), tmp_path / "out", opset=9)
    with pytest.raises(BidirError, match="dtype must be one of"):
        export_onnx(make_tiny_checkpoint("avg"), tmp_path / "out", dtype="int8")


def test_failed_verification_writes_nothing(tmp_path, make_tiny_checkpoint, monkeypatch):
    # Corrupt the graph between export and verification (as a wrong export would be): the check must catch it.
    import bidir_export.onnx_export as onnx_export

    real = onnx_export._check_onnx

    def corrupting(path):
        model = onnx.load(str(path))
        init = next(i for i in model.graph.initializer if "embed_tokens" in i.name)
        array = onnx.numpy_helper.to_array(init).copy()
        array[:, 0] += 0.5
        init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
        onnx.save(model, str(path))
        return real(path)

    monkeypatch.setattr(onnx_export, "_check_onnx", corrupting)
    with pytest.raises(BidirError, match="not written: verification FAILED"):
        export_onnx(make_tiny_checkpoint("avg"), tmp_path / "out", verify_shape=(2, 8))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_huge_verify_shape_is_refused_before_the_export(tmp_path, make_tiny_checkpoint, capsys, monkeypatch):
    # Regression: --verify-shape 99999999999x1 exported, then tried an 800 GB allocation with a traceback.
    import bidir_export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "_export_graph", lambda *a: pytest.fail("exported before the check"))
    out = tmp_path / "out"
    assert onnx_main([str(make_tiny_checkpoint("avg")), str(out), "--verify-shape", "99999999999x1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "verify shape 99999999999x1: at most 65536 tokens" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_onnx_file_that_does_not_match_its_manifest(tmp_path, exported):
    plain, _ = exported("avg")
    with_dims, _ = exported("avg", True)

    swapped = tmp_path / "swapped"  # a manifest without dimensions over a graph that takes them
    shutil.copytree(plain, swapped)
    shutil.copy(with_dims / "model.onnx", swapped / "model.onnx")
    with pytest.raises(BidirError, match=r"graph inputs \['input_ids', 'attention_mask', 'dimensions'\]"):
        verify_export(swapped)

    renamed = tmp_path / "renamed"  # the graph's output renamed
    shutil.copytree(plain, renamed)
    model = onnx.load(str(renamed / "model.onnx"))
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["pooled" if o == old else o for o in node.output]
    model.graph.output[0].name = "pooled"
    onnx.save(model, str(renamed / "model.onnx"))
    with pytest.raises(BidirError, match=r"graph outputs \['pooled'\] do not match"):
        verify_export(renamed)

    wide = tmp_path / "wide"  # the manifest claims another width
    shutil.copytree(plain, wide)
    raw = json.loads((wide / "manifest.json").read_text())
    raw["hidden_size"] = 128
    (wide / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BidirError, match=r"the manifest says float32 \(batch, 128\)"):
        verify_export(wide)

    (wide / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(BidirError, match="not a readable ONNX model"):
        verify_export(wide)
