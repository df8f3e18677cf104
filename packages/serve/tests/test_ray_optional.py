"""Ray is an optional extra: without it bidir-serve works (the local engine), and --engine ray says in one line
which package to install. "Without it" is made by blocking the import (sys.modules["ray"] = None), so the test runs
whether or not the extra is installed."""

from __future__ import annotations

import json
import sys

from bidir_core.embeddings_artifact import read_embeddings
from bidir_serve.batch_embed import main


def test_without_ray_local_works_and_ray_engine_names_the_extra(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"d{i}", "text": f"text {i}"}) + "\n" for i in range(3)))
    args = ["--model", str(tiny_checkpoint), "--input", str(inp), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "local")]) == 0
    assert read_embeddings(tmp_path / "local").ids() == ["d0", "d1", "d2"]
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "ray"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert err == "batch-embed: error: --engine ray needs Ray: pip install 'bidir-serve[ray]'\n"
    assert not (tmp_path / "ray").exists()  # refused before any work
