"""Hostile and careless input and faults in batch-embed (issue 14): each is one line naming the file (and line or
row), nothing half-written is left looking complete, a rerun recomputes what is missing, and NaN is an error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bidir_core import BidirError
from bidir_core.checkpoint import EncoderConfig
from bidir_core.embeddings_artifact import read_embeddings, read_embeddings_manifest
from bidir_core.testing import tiny_encoder
from bidir_serve import BatchEmbedConfig, embed_corpus
from bidir_serve.batch_embed import main


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def _run(model, inp, out, **kw):
    return embed_corpus(BatchEmbedConfig(str(model), str(inp), str(out), progress=False, **kw))


def _texts(n):
    return [f"text number {i} about dense search" for i in range(n)]


# --- item 7: a rerun checks the shards it claims -----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["delete", "truncate", "other rows"])
def test_missing_or_damaged_shard_is_recomputed(tiny_checkpoint, tmp_path, damage):
    inp, out = _jsonl(tmp_path / "in.jsonl", _texts(10)), tmp_path / "out"
    _run(tiny_checkpoint, inp, out, shard_size=4)
    first = read_embeddings(out).embeddings()
    shard = out / "part-00001.parquet"
    if damage == "delete":
        shard.unlink()
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-20])  # the footer is gone
    else:
        pq.write_table(pq.read_table(shard).slice(0, 2), shard)  # readable, 2 rows where the manifest says 4
    again = _run(tiny_checkpoint, inp, out, shard_size=4)
    assert again.complete and again.rows_embedded == 4 and again.shards_written == 1
    np.testing.assert_array_equal(read_embeddings(out).embeddings(), first)


# --- item 5: non-finite embeddings stop the job before anything is marked complete ---------------------------------


def test_nan_model_stops_naming_shard_and_row(tmp_path, capsys):
    enc = tiny_encoder(EncoderConfig(max_length=48))
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(float("nan"))
    model = enc.save_pretrained(tmp_path / "nan-model")
    inp, out = _jsonl(tmp_path / "in.jsonl", _texts(6)), tmp_path / "out"
    assert main(["--model", str(model), "--input", str(inp), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "part-00000.parquet: the model" in err and "non-finite (nan/inf) embeddings" in err
    assert "in.jsonl:" in err  # the input row
    assert not list(out.glob("*.parquet")) and not list(out.glob(".part-*"))
    assert not read_embeddings_manifest(out).complete


# --- item 6, 9, 12: bad rows are one line naming where ---------------------------------------------------------------


def test_lone_surrogate_is_reported_at_its_line_before_its_shard(tiny_checkpoint, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": "cut emoji \\ud83d"}\n')
    with pytest.raises(BidirError, match=r"in\.jsonl:2: field 'text' holds a lone surrogate"):
        _run(tiny_checkpoint, inp, tmp_path / "out")
    assert not list((tmp_path / "out").glob("part-*"))  # the shard holding the row is never published


def test_deeply_nested_json_line(tiny_checkpoint, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "text": "x", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(BidirError, match=r"in\.jsonl:1: JSON nested too deeply"):
        _run(tiny_checkpoint, inp, tmp_path / "out")


def test_invalid_utf8_in_a_parquet_string_column(tiny_checkpoint, tmp_path):
    text = pa.array([b"fine", b"\xff not utf-8"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["a", "b"], "text": text}), tmp_path / "bad.parquet")
    with pytest.raises(BidirError, match=r"bad\.parquet rows 1\.\.4096: cannot read .*utf-8"):
        _run(tiny_checkpoint, tmp_path / "bad.parquet", tmp_path / "out")


def test_truncated_onnx_model_is_one_line(onnx_export, tmp_path, capsys):
    folder = shutil.copytree(onnx_export(), tmp_path / "onnx")
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    inp = _jsonl(tmp_path / "in.jsonl", _texts(3))
    assert (
        main(["--model", str(folder), "--input", str(inp), "--output", str(tmp_path / "o"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.onnx: onnxruntime cannot load it" in err


def test_unwritable_output_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    inp = _jsonl(tmp_path / "in.jsonl", _texts(3))
    # The model does not exist: the output is checked first, so its error is the one reported.
    with pytest.raises(BidirError, match=r"afile/out/manifest\.json: cannot be written"):
        _run(tmp_path / "no-such-model", inp, tmp_path / "afile" / "out")


def test_disk_full_names_the_file(tiny_checkpoint, tmp_path, monkeypatch):
    inp, out = _jsonl(tmp_path / "in.jsonl", _texts(6)), tmp_path / "out"

    def full(self, table, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    with pytest.raises(BidirError, match=r"out/\.part-00000\.parquet\.tmp: cannot write .*No space left"):
        _run(tiny_checkpoint, inp, out, shard_size=4)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no temp file, no shard


# --- item 13 ---------------------------------------------------------------------------------------------------------


def test_text_files_of_one_name_in_two_folders_get_distinct_ids(tiny_checkpoint, tmp_path):
    for folder in ("docs", "notes"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text(f"first of {folder}\nsecond of {folder}\n")
    (tmp_path / "docs" / "b.txt").write_text("only line\n")
    _run(tiny_checkpoint, tmp_path / "*" / "*.txt", tmp_path / "out")
    ids = read_embeddings(tmp_path / "out").ids()
    assert ids == ["docs/a.txt:1", "docs/a.txt:2", "docs/b.txt:1", "notes/a.txt:1", "notes/a.txt:2"]


def test_shard_and_manifest_are_fsynced_before_they_count(tiny_checkpoint, tmp_path, monkeypatch):
    import os
    import re

    synced = []
    real = os.fsync

    def spy(fd):  # the name of what is being fsynced (Linux: /proc/self/fd)
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    _run(tiny_checkpoint, _jsonl(tmp_path / "in.jsonl", _texts(3)), tmp_path / "out")
    # each file's data under its temp name (before the rename that publishes it), then its folder (the rename):
    # the planned manifest, the shard, the complete manifest
    manifest_tmp = r"\.manifest\.json\..*\.tmp"
    expected = [manifest_tmp, "out", r"\.part-00000\.parquet\.tmp", "out", manifest_tmp, "out"]
    assert len(synced) == len(expected), synced
    assert all(re.fullmatch(e, n) for e, n in zip(expected, synced, strict=True)), synced


# --- issue 29 ----------------------------------------------------------------------------------------------------


def test_overwrite_deletes_only_our_own_files(tiny_checkpoint, tmp_path):
    """--overwrite removes our shards, temp shards and manifest, not a user's part-*.parquet of another name."""
    inp, out = _jsonl(tmp_path / "in.jsonl", _texts(6)), tmp_path / "out"
    _run(tiny_checkpoint, inp, out, shard_size=2)
    pq.write_table(pa.table({"x": [1]}), out / "part-final-report.parquet")
    (out / ".part-00007.parquet.tmp").write_bytes(b"left by a killed run")
    _run(tiny_checkpoint, inp, out, shard_size=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-final-report.parquet",
    ]
    assert read_embeddings(out).ids() == [f"doc-{i}" for i in range(6)]


@pytest.mark.parametrize("name", ["a.parquet", "a.jsonl"])
def test_one_column_for_id_and_text(tiny_checkpoint, encoder, tmp_path, name):
    """--id-field and --text-field naming the same column: each text is its own id."""
    texts = _texts(5)
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"body": texts}), tmp_path / name)
    else:
        (tmp_path / name).write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    _run(tiny_checkpoint, tmp_path / name, tmp_path / "out", id_field="body", text_field="body", shard_size=2)
    art = read_embeddings(tmp_path / "out")
    assert art.ids() == texts
    np.testing.assert_allclose(art.embeddings(), encoder.encode_documents(texts), atol=1e-5, rtol=0)


def test_a_shard_copied_over_another_is_refused_and_recomputed(tiny_checkpoint, tmp_path):
    inp, out = _jsonl(tmp_path / "in.jsonl", _texts(10)), tmp_path / "out"
    _run(tiny_checkpoint, inp, out, shard_size=4)
    first = read_embeddings(out)
    ids, emb = first.ids(), first.embeddings()
    shutil.copyfile(out / "part-00000.parquet", out / "part-00001.parquet")  # 4 rows each: counts agree
    with pytest.raises(BidirError, match=r"part-00001\.parquet: holds shard 0 of this job, not shard 1"):
        read_embeddings(out)
    again = _run(tiny_checkpoint, inp, out, shard_size=4)
    assert again.complete and again.rows_embedded == 4 and again.shards_written == 1
    assert read_embeddings(out).ids() == ids
    np.testing.assert_array_equal(read_embeddings(out).embeddings(), emb)


def _same_length_rewrite(path: Path, keep_times: bool) -> None:
    """Every 'old' becomes 'new': the same size, other text; keep_times puts the modification time back, as a
    hostile rewrite (or a copy with preserved times) would."""
    st = path.stat()
    if path.suffix == ".parquet":
        texts = [t.replace("old", "new") for t in pq.read_table(path).column("text").to_pylist()]
        pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts}), path)
    else:
        path.write_bytes(path.read_bytes().replace(b"old", b"new"))
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("keep_times", [False, True])
@pytest.mark.parametrize("name", ["in.txt", "in.jsonl", "in.parquet"])
def test_input_rewritten_between_shards_is_refused(tiny_checkpoint, tmp_path, monkeypatch, keep_times, name):
    """The input rewritten in place (same size) when shard 2 starts reading it: one line, nothing marked
    complete; before, shards 0-1 held the old text and the rest the new, in an artifact called complete."""
    from bidir_serve.batch import plan
    from bidir_serve.batch.plan import file_stamp

    inp, out = tmp_path / name, tmp_path / "out"
    if name.endswith(".txt"):
        inp.write_text("".join(f"line {i} old\n" for i in range(8)))
    elif name.endswith(".parquet"):
        texts = [f"line {i} old" for i in range(8)]
        pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(8)], "text": texts}), inp, row_group_size=2)
    else:
        _jsonl(inp, [f"line {i} old" for i in range(8)])
    real = plan._file_rows

    def rewrite_at_shard_2(f, lo, hi, *args):
        if lo == 4 and f.stamp == file_stamp(inp):  # not yet rewritten
            _same_length_rewrite(inp, keep_times)
        return real(f, lo, hi, *args)

    monkeypatch.setattr(plan, "_file_rows", rewrite_at_shard_2)
    with pytest.raises(BidirError, match=rf"{name}: changed during the job") as e:
        _run(tiny_checkpoint, inp, out, shard_size=2)
    assert "\n" not in str(e.value)
    assert not read_embeddings_manifest(out).complete
    assert not (out / "part-00002.parquet").exists()  # the shard that read the new bytes is not published


def test_input_rewritten_after_the_last_read_is_refused_before_the_manifest(
    tiny_checkpoint, tmp_path, monkeypatch
):
    from bidir_core.embeddings_artifact import ShardWriter

    inp, out = tmp_path / "in.txt", tmp_path / "out"
    inp.write_text("".join(f"line {i} old\n" for i in range(4)))
    close = ShardWriter.close

    def rewrite_after_the_last_shard(self):
        path = close(self)
        if path.name == "part-00001.parquet":  # every row has been read by now
            _same_length_rewrite(inp, keep_times=True)
        return path

    monkeypatch.setattr(ShardWriter, "close", rewrite_after_the_last_shard)
    with pytest.raises(BidirError, match=r"in\.txt: changed during the job"):
        _run(tiny_checkpoint, inp, out, shard_size=2)
    assert not read_embeddings_manifest(out).complete


def test_rewritten_bytes_are_caught_even_where_the_file_times_do_not_move(tmp_path):
    """A filesystem whose times do not move (coarse or faked): the bytes a shard reads are compared with the
    planning pass's digest of the same bytes."""
    import dataclasses

    from bidir_serve.batch.plan import file_stamp, plan_inputs, shard_rows

    inp = tmp_path / "in.jsonl"
    inp.write_text(
        '{"id": "a", "text": "x old"}\n\n{"id": "b", "text": "y old"}\n  \n{"id": "c", "text": "z"}\n\n'
    )
    plan = plan_inputs([inp], "id", "text", 2)
    assert [r.id for k in range(2) for r in shard_rows(plan, k, "id", "text")] == ["a", "b", "c"]
    _same_length_rewrite(inp, keep_times=False)
    f = plan.files[0]
    stale = dataclasses.replace(plan, files=(dataclasses.replace(f, stamp=file_stamp(inp)),))
    with pytest.raises(BidirError, match=r"in\.jsonl: changed during the job \(the bytes of rows 1\.\.2"):
        list(shard_rows(stale, 0, "id", "text"))
    assert [r.id for r in shard_rows(stale, 1, "id", "text")] == ["c"]  # its bytes did not change
