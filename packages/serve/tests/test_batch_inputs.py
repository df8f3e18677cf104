"""bidir_serve.batch.inputs: a bad row of any input format is one line naming the file and line (or rows) before its
shard is written; text files of one name in two folders get distinct ids; one column may be both id and text."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_testing import embed, numbered_texts

from bidir_core import BidirError
from bidir_core.embeddings_artifact import read_embeddings


def test_lone_surrogate_is_reported_at_its_line_before_its_shard(tiny_checkpoint, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": "cut emoji \\ud83d"}\n')
    with pytest.raises(BidirError, match=r"in\.jsonl:2: field 'text' holds a lone surrogate"):
        embed(tiny_checkpoint, inp, tmp_path / "out")
    assert not list((tmp_path / "out").glob("part-*"))  # the shard holding the row is never published


def test_deeply_nested_json_line(tiny_checkpoint, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "text": "x", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(BidirError, match=r"in\.jsonl:1: JSON nested too deeply"):
        embed(tiny_checkpoint, inp, tmp_path / "out")


def test_invalid_utf8_in_a_parquet_string_column(tiny_checkpoint, tmp_path):
    text = pa.array([b"fine", b"\xff not utf-8"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["a", "b"], "text": text}), tmp_path / "bad.parquet")
    with pytest.raises(BidirError, match=r"bad\.parquet rows 1\.\.4096: cannot read .*utf-8"):
        embed(tiny_checkpoint, tmp_path / "bad.parquet", tmp_path / "out")


def test_text_files_of_one_name_in_two_folders_get_distinct_ids(tiny_checkpoint, tmp_path):
    for folder in ("docs", "notes"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text(f"first of {folder}\nsecond of {folder}\n")
    (tmp_path / "docs" / "b.txt").write_text("only line\n")
    embed(tiny_checkpoint, tmp_path / "*" / "*.txt", tmp_path / "out")
    ids = read_embeddings(tmp_path / "out").ids()
    assert ids == ["docs/a.txt:1", "docs/a.txt:2", "docs/b.txt:1", "notes/a.txt:1", "notes/a.txt:2"]


@pytest.mark.parametrize("name", ["a.parquet", "a.jsonl"])
def test_one_column_for_id_and_text(tiny_checkpoint, encoder, tmp_path, name):
    """--id-field and --text-field naming the same column: each text is its own id."""
    texts = numbered_texts(5)
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"body": texts}), tmp_path / name)
    else:
        (tmp_path / name).write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    embed(
        tiny_checkpoint, tmp_path / name, tmp_path / "out", id_field="body", text_field="body", shard_size=2
    )
    art = read_embeddings(tmp_path / "out")
    assert art.ids() == texts
    np.testing.assert_allclose(art.embeddings(), encoder.encode_documents(texts), atol=1e-5, rtol=0)
