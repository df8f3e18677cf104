"""bidir_export.output_folder: an export is staged beside its target and replaces only an earlier export (never a
folder of other files, nor files added while it ran); a target that cannot be written is refused; the temporary
folders of killed exports are removed."""

from __future__ import annotations

import json
import shutil

import pytest
from export_testing import leftovers

from bidir_core import BidirError
from bidir_export import export_onnx
from bidir_export.cli import onnx_main


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
    # Regression: any folder with a manifest.json was deleted by --overwrite.
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
    assert leftovers(tmp_path) == []

    earlier = tmp_path / "earlier"  # an export is replaced
    shutil.copytree(exported("avg")[0], earlier)
    assert onnx_main([ckpt, str(earlier), "--overwrite", "--no-verify", "--with-dims"]) == 0
    assert "dimensions" in json.loads((earlier / "manifest.json").read_text())["inputs"]
    assert leftovers(tmp_path) == []


def test_stale_temp_folders_are_cleaned_at_start(tmp_path, make_tiny_checkpoint):
    # Regression: a killed export left .out.tmp-*/ (with the multi-GB graph) beside the target, forever.
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
