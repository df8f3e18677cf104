"""bidir_serve.batch.windows: non-finite embeddings stop the job before anything is marked complete, in one line
naming the shard and the input row."""

from __future__ import annotations

import torch
from batch_testing import numbered_texts, write_jsonl

from bidir_core.checkpoint import EncoderConfig
from bidir_core.embeddings_artifact import read_embeddings_manifest
from bidir_core.testing import tiny_encoder
from bidir_serve.batch_embed import main


def test_nan_model_stops_naming_shard_and_row(tmp_path, capsys):
    enc = tiny_encoder(EncoderConfig(max_length=48))
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(float("nan"))
    model = enc.save_pretrained(tmp_path / "nan-model")
    inp, out = write_jsonl(tmp_path / "in.jsonl", numbered_texts(6)), tmp_path / "out"
    assert main(["--model", str(model), "--input", str(inp), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "part-00000.parquet: the model" in err and "non-finite (nan/inf) embeddings" in err
    assert "in.jsonl:" in err  # the input row
    assert not list(out.glob("*.parquet")) and not list(out.glob(".part-*"))
    assert not read_embeddings_manifest(out).complete
