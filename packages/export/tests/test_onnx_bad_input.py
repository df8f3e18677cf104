"""Bad input: one-line errors naming the file, and nothing half-written left behind."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from bidir_core import BidirError
from bidir_export import export_onnx, verify_export
from bidir_export.cli import onnx_main


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(BidirError, match="no config.json"):
        export_onnx(tmp_path / "notes", tmp_path / "out")
    assert onnx_main([str(tmp_path / "notes"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "export-onnx: error:" in err and "notes" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_missing_source_and_bad_options(tmp_path, make_tiny_checkpoint):
    with pytest.raises(BidirError, match="no such file or folder"):
        export_onnx(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(BidirError, match="opset must be"):
        export_onnx(make_tiny_checkpoint("avg"), tmp_path / "out", opset=9)
    with pytest.raises(BidirError, match="dtype must be one of"):
        export_onnx(make_tiny_checkpoint("avg"), tmp_path / "out", dtype="int8")


def test_unwritable_output(tmp_path, make_tiny_checkpoint):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BidirError, match="cannot write there"):
        export_onnx(make_tiny_checkpoint("avg"), tmp_path / "file" / "out")  # a path under a regular file


def test_existing_folders_are_not_replaced(tmp_path, make_tiny_checkpoint, exported):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(BidirError, match="is not an ONNX export .*refusing to replace it"):
        export_onnx(make_tiny_checkpoint("avg"), mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "precious"
    out, _ = exported("avg")
    with pytest.raises(BidirError, match="pass --overwrite"):
        export_onnx(make_tiny_checkpoint("avg"), out)


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
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


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


def _embeddings_folder(folder):
    """A complete batch-embed output (what bidir-serve's batch-embed writes), made with core's writers."""
    import numpy as np

    from bidir_core.embeddings_artifact import (
        EmbeddingsManifest,
        Shard,
        write_embeddings_manifest,
        write_shard,
    )

    folder.mkdir()
    write_shard(folder, 0, ["a", "b"], np.ones((2, 4), dtype=np.float32))
    manifest = EmbeddingsManifest(
        model="tiny",
        model_fingerprint="sha256:0",
        dim=4,
        dtype="float32",
        normalize=True,
        prompt="passage",
        prefix="passage: ",
        input_fingerprint="sha256:0",
        shards=(Shard("part-00000.parquet", 2),),
        complete=True,
    )
    write_embeddings_manifest(folder, manifest)
    return sorted(p.name for p in folder.iterdir())


def test_overwrite_replaces_only_an_earlier_export(tmp_path, make_tiny_checkpoint, exported, capsys):
    # Issue 14.1: any folder with a manifest.json was deleted by --overwrite.
    ckpt = str(make_tiny_checkpoint("avg"))
    embeddings = tmp_path / "embeddings"
    before = _embeddings_folder(embeddings)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"mine": 1}')
    (mine / "notes.txt").write_text("important")
    added = tmp_path / "added"  # an earlier export someone put their own file into
    shutil.copytree(exported("avg")[0], added)
    (added / "notes.txt").write_text("important")
    for folder, message in [
        (embeddings, "is not an ONNX export"),
        (mine, "is not an ONNX export"),
        (added, "holds notes.txt, which an ONNX export does not have"),
    ]:
        assert onnx_main([ckpt, str(folder), "--overwrite", "--no-verify"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "refusing to replace it" in err
        assert "Traceback" not in err
    assert sorted(p.name for p in embeddings.iterdir()) == before
    assert (mine / "notes.txt").read_text() == "important" and (
        added / "notes.txt"
    ).read_text() == "important"
    assert _leftovers(tmp_path) == []

    earlier = tmp_path / "earlier"  # an export is replaced
    shutil.copytree(exported("avg")[0], earlier)
    assert onnx_main([ckpt, str(earlier), "--overwrite", "--no-verify", "--with-dims"]) == 0
    assert "dimensions" in json.loads((earlier / "manifest.json").read_text())["inputs"]
    assert _leftovers(tmp_path) == []


def test_stale_temp_folders_are_cleaned_at_start(tmp_path, make_tiny_checkpoint):
    # Issue 14.11: a killed export left .out.tmp-*/ (with the multi-GB graph) beside the target, forever.
    import os
    import subprocess
    import sys

    from bidir_core.folders import make_temp_folder

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    out = tmp_path / "out"
    mine = make_temp_folder(out)
    killed = mine.rename(
        tmp_path / mine.name.replace(f"-{os.getpid()}-", f"-{pid}-")
    )  # as a dead run named it
    (killed / "model.onnx").write_bytes(b"half a graph")
    live = make_temp_folder(out)  # this process is alive: a concurrent writer's folder stays
    elsewhere = tmp_path / f".out.tmp-otherhost-{pid}-abcdefgh"  # another host's pid cannot be checked: kept
    elsewhere.mkdir()
    other = tmp_path / ".outside.tmp-abcdefgh"  # another target's name: kept
    other.mkdir()
    export_onnx(make_tiny_checkpoint("avg"), out, verify=False)
    assert not killed.exists() and live.is_dir() and elsewhere.is_dir() and other.is_dir()
    assert (out / "manifest.json").is_file()


def test_huge_verify_shape_is_refused_before_the_export(tmp_path, make_tiny_checkpoint, capsys, monkeypatch):
    # Issue 14.12: --verify-shape 99999999999x1 exported, then tried an 800 GB allocation with a traceback.
    import bidir_export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "_export_graph", lambda *a: pytest.fail("exported before the check"))
    out = tmp_path / "out"
    assert onnx_main([str(make_tiny_checkpoint("avg")), str(out), "--verify-shape", "99999999999x1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "verify shape 99999999999x1: at most 65536 tokens" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_files_added_to_the_target_during_an_export_are_never_deleted(tmp_path, exported):
    """The target is checked again just before it is replaced: an export can take many minutes."""
    import shutil

    from bidir_export.output_folder import staged_folder

    good, _ = exported("avg")
    target = tmp_path / "target"
    shutil.copytree(good, target)
    refused = pytest.raises(BidirError, match="notes.txt.*refusing to replace it")
    with refused, staged_folder(target, "onnx", overwrite=True) as tmp:
        (tmp / "model.onnx").write_bytes(b"new")
        (target / "notes.txt").write_text("mine")  # a user's file, added while we were working
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.onnx").is_file()
    assert not list(tmp_path.glob(".target.*"))  # and our temp folder is gone
