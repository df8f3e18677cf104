"""bidir_serve.batch.plan: shards are fixed slices found from file metadata and one counting pass, read without the
rows before them; ids are checked unique within a shard always and across shards with --check-unique-ids; memory
does not grow with the corpus; an input rewritten during the job (even where file times do not move) is refused in
one line before anything is marked complete.

Oracle: the rows a plain read of every file from the top gives, in order (a plan with one shard per file is that)."""

from __future__ import annotations

import dataclasses
import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_testing import embed, write_jsonl

from bidir_core import BidirError
from bidir_core.embeddings_artifact import read_embeddings, read_embeddings_manifest
from bidir_serve import BatchEmbedConfig, embed_corpus
from bidir_serve.batch.plan import file_stamp, plan_inputs, resolve_inputs, shard_rows
from bidir_serve.batch.unique_ids import check_unique_ids


def _mixed_corpus(folder: Path) -> list[Path]:
    """Three formats in one glob: JSONL with blank lines and a BOM, Parquet of several row groups, plain text."""
    lines = ["\ufeff" + json.dumps({"id": "j0", "text": "first"})]
    for i in range(1, 11):
        lines.append(json.dumps({"id": f"j{i}", "text": f"json row {i}"}))
        if i % 3 == 0:
            lines.append("   ")  # blank: not a row
    (folder / "a.jsonl").write_text("\n".join(lines))  # no final newline
    table = pa.table({"id": [f"p{i}" for i in range(13)], "text": [f"parquet row {i}" for i in range(13)]})
    pq.write_table(table, folder / "b.parquet", row_group_size=4)
    (folder / "c.txt").write_text("".join(f"text line {i}\r\n" for i in range(7)))
    return resolve_inputs(folder / "*")


def _all_rows(files, shard_size):
    plan = plan_inputs(files, "id", "text", shard_size)
    return plan, [r for k in range(plan.n_shards) for r in shard_rows(plan, k, "id", "text")]


@pytest.mark.parametrize("shard_size", [1, 2, 3, 4, 5, 7, 11, 100])
def test_shards_are_fixed_slices_of_the_input(tmp_path, shard_size):
    files = _mixed_corpus(tmp_path)
    _, oracle = _all_rows(files, 10**9)
    # one text file: ids are its line numbers; j4 comes after a blank line
    assert len(oracle) == 11 + 13 + 7 and oracle[0].id == "j0" and oracle[-1].id == "7"
    assert oracle[11].where.endswith("b.parquet row 1") and oracle[4].where.endswith("a.jsonl:6")
    plan, rows = _all_rows(files, shard_size)
    assert [(r.id, r.text, r.where) for r in rows] == [(r.id, r.text, r.where) for r in oracle]
    for k in range(plan.n_shards):  # each shard alone, as a rank that owns only it reads it
        alone = list(shard_rows(plan, k, "id", "text"))
        assert [r.id for r in alone] == [r.id for r in oracle[k * shard_size : (k + 1) * shard_size]]
        assert len(alone) == plan.shard_rows(k)


def test_duplicate_ids_within_a_shard_and_across_shards(tiny_checkpoint, tmp_path):
    inp = tmp_path / "in.jsonl"
    ids = ["a", "b", "c", "d", "b", "e"]  # "b" at lines 2 and 5
    inp.write_text("".join(json.dumps({"id": i, "text": f"text {i}"}) + "\n" for i in ids))
    run = dict(model=str(tiny_checkpoint), input=str(inp), progress=False)
    with pytest.raises(
        BidirError, match=r"duplicate id 'b' again at .*in\.jsonl:5 \(first at .*in\.jsonl:2\)"
    ):
        embed_corpus(BatchEmbedConfig(output=str(tmp_path / "one"), shard_size=6, **run))
    # Across shards (rows 1-3 | 4-6) only the explicit check sees it, before any work.
    with pytest.raises(
        BidirError, match=r"1 duplicate id\(s\) in the input, the first 'b' again at .*in\.jsonl:5"
    ):
        embed_corpus(
            BatchEmbedConfig(output=str(tmp_path / "two"), shard_size=3, check_unique_ids=True, **run)
        )
    assert not (tmp_path / "two").exists()
    embed_corpus(
        BatchEmbedConfig(output=str(tmp_path / "three"), shard_size=3, **run)
    )  # not checked: documented
    assert read_embeddings(tmp_path / "three").ids() == ids


def test_unique_id_check_reports_the_first_repeat_in_input_order(tmp_path, monkeypatch):
    import bidir_serve.batch.unique_ids as unique_ids

    monkeypatch.setattr(
        unique_ids, "BUCKET_ROWS", 3
    )  # buckets split in two, again and again: the first repeat
    monkeypatch.setattr(unique_ids, "FANOUT", 2)  # in input order must still win
    ids = [f"x{i}" for i in range(30)] + ["x7", "x2", "x7"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "text": "t"}) + "\n" for i in ids))
    plan = plan_inputs([tmp_path / "in.jsonl"], "id", "text", 4)
    with pytest.raises(
        BidirError, match=r"^3 duplicate id\(s\) in the input, the first 'x7' again at .*:31 \("
    ):
        check_unique_ids(plan, "id", "text")


def test_an_input_that_changed_during_the_job_is_an_error(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("a\nb\nc\nd\n")
    plan = plan_inputs([inp], "id", "text", 2)
    inp.write_text("a\nb\nc\n")
    with pytest.raises(BidirError, match=r"in\.txt: changed during the job \(its size, modification time"):
        list(shard_rows(plan, 1, "id", "text"))
    # where the stamp did not move (a coarse clock, faked times), the missing row is still caught
    stale = dataclasses.replace(plan, files=(dataclasses.replace(plan.files[0], stamp=file_stamp(inp)),))
    with pytest.raises(BidirError, match=r"in\.txt: fewer rows than the 4 it had when the job was planned"):
        list(shard_rows(stale, 1, "id", "text"))


def _peak_bytes(n_rows: int, folder: Path) -> int:
    """Peak Python heap while planning and validating (reading every row, and the unique-id check) n_rows."""
    folder.mkdir()
    per_file = n_rows // 5
    for f in range(4):
        ids = [f"doc-{f}-{i}" for i in range(per_file)]
        pq.write_table(pa.table({"id": ids, "text": ["a short text"] * per_file}), folder / f"{f}.parquet")
    with (folder / "more.jsonl").open("w") as out:
        for i in range(per_file):
            out.write(json.dumps({"id": f"j{i}", "text": "a short text"}) + "\n")
    files = resolve_inputs(folder / "*")
    tracemalloc.start()
    try:
        plan = plan_inputs(files, "id", "text", 2_000)
        check_unique_ids(plan, "id", "text")  # reads every row once, ids spilled to disk
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_as_the_corpus_grows(tmp_path, monkeypatch):
    """5x the rows, same peak: nothing keeps every row or id (before, every id went into one set)."""
    import bidir_serve.batch.unique_ids as unique_ids

    monkeypatch.setattr(unique_ids, "BUCKET_ROWS", 5_000)  # both corpora: buckets of 5,000 ids
    small, large = _peak_bytes(20_000, tmp_path / "small"), _peak_bytes(100_000, tmp_path / "large")
    tracemalloc.start()
    try:  # what the scan this replaced held at the end: a set of every id of the large corpus
        ids = {f"doc-{f}-{i}" for f in range(5) for i in range(20_000)}
        one_set = tracemalloc.get_traced_memory()[1]
        del ids
    finally:
        tracemalloc.stop()
    # 80,000 more rows add under a fifth of what their ids alone would take in one set; the bound (one shard's id
    # set, one bucket of 5,000 ids, 64 file buffers, a Parquet batch) is under half of that set.
    assert large - small < 0.2 * one_set and large < 0.5 * one_set, (small, large, one_set)


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
        write_jsonl(inp, [f"line {i} old" for i in range(8)])
    real = plan._file_rows

    def rewrite_at_shard_2(f, lo, hi, *args):
        if lo == 4 and f.stamp == file_stamp(inp):  # not yet rewritten
            _same_length_rewrite(inp, keep_times)
        return real(f, lo, hi, *args)

    monkeypatch.setattr(plan, "_file_rows", rewrite_at_shard_2)
    with pytest.raises(BidirError, match=rf"{name}: changed during the job") as e:
        embed(tiny_checkpoint, inp, out, shard_size=2)
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
        embed(tiny_checkpoint, inp, out, shard_size=2)
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
