"""bidir_serve.batch.folder: the output folder of a batch-embed job. A rerun checks the shards it claims and
recomputes a missing, damaged or swapped one; an output that cannot be written is refused before the model loads, a
full disk names the file; shards and manifest are fsynced before they count; --overwrite deletes only the job's own
files."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_testing import embed, numbered_texts, write_jsonl

from bidir_core import BidirError
from bidir_core.embeddings_artifact import read_embeddings


@pytest.mark.parametrize("damage", ["delete", "truncate", "other rows"])
def test_missing_or_damaged_shard_is_recomputed(tiny_checkpoint, tmp_path, damage):
    inp, out = write_jsonl(tmp_path / "in.jsonl", numbered_texts(10)), tmp_path / "out"
    embed(tiny_checkpoint, inp, out, shard_size=4)
    first = read_embeddings(out).embeddings()
    shard = out / "part-00001.parquet"
    if damage == "delete":
        shard.unlink()
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-20])  # the footer is gone
    else:
        pq.write_table(pq.read_table(shard).slice(0, 2), shard)  # readable, 2 rows where the manifest says 4
    again = embed(tiny_checkpoint, inp, out, shard_size=4)
    assert again.complete and again.rows_embedded == 4 and again.shards_written == 1
    np.testing.assert_array_equal(read_embeddings(out).embeddings(), first)


def test_a_shard_copied_over_another_is_refused_and_recomputed(tiny_checkpoint, tmp_path):
    inp, out = write_jsonl(tmp_path / "in.jsonl", numbered_texts(10)), tmp_path / "out"
    embed(tiny_checkpoint, inp, out, shard_size=4)
    first = read_embeddings(out)
    ids, emb = first.ids(), first.embeddings()
    shutil.copyfile(out / "part-00000.parquet", out / "part-00001.parquet")  # 4 rows each: counts agree
    with pytest.raises(BidirError, match=r"part-00001\.parquet: holds shard 0 of this job, not shard 1"):
        read_embeddings(out)
    again = embed(tiny_checkpoint, inp, out, shard_size=4)
    assert again.complete and again.rows_embedded == 4 and again.shards_written == 1
    assert read_embeddings(out).ids() == ids
    np.testing.assert_array_equal(read_embeddings(out).embeddings(), emb)


def test_unwritable_output_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    inp = write_jsonl(tmp_path / "in.jsonl", numbered_texts(3))
    # The model does not exist: the output is checked first, so its error is the one reported.
    with pytest.raises(BidirError, match=r"afile/out/manifest\.json: cannot be written"):
        embed(tmp_path / "no-such-model", inp, tmp_path / "afile" / "out")


def test_disk_full_names_the_file(tiny_checkpoint, tmp_path, monkeypatch):
    inp, out = write_jsonl(tmp_path / "in.jsonl", numbered_texts(6)), tmp_path / "out"

    def full(self, table, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    with pytest.raises(BidirError, match=r"out/\.part-00000\.parquet\.tmp: cannot write .*No space left"):
        embed(tiny_checkpoint, inp, out, shard_size=4)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no temp file, no shard


def test_shard_and_manifest_are_fsynced_before_they_count(tiny_checkpoint, tmp_path, monkeypatch):

    synced = []
    real = os.fsync

    def spy(fd):  # the name of what is being fsynced (Linux: /proc/self/fd)
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    embed(tiny_checkpoint, write_jsonl(tmp_path / "in.jsonl", numbered_texts(3)), tmp_path / "out")
    # each file's data under its temp name (before the rename that publishes it), then its folder (the rename):
    # the planned manifest, the shard, the complete manifest
    manifest_tmp = r"\.manifest\.json\..*\.tmp"
    expected = [manifest_tmp, "out", r"\.part-00000\.parquet\.tmp", "out", manifest_tmp, "out"]
    assert len(synced) == len(expected), synced
    assert all(re.fullmatch(e, n) for e, n in zip(expected, synced, strict=True)), synced


def test_overwrite_deletes_only_our_own_files(tiny_checkpoint, tmp_path):
    """--overwrite removes our shards, temp shards and manifest, not a user's part-*.parquet of another name."""
    inp, out = write_jsonl(tmp_path / "in.jsonl", numbered_texts(6)), tmp_path / "out"
    embed(tiny_checkpoint, inp, out, shard_size=2)
    pq.write_table(pa.table({"x": [1]}), out / "part-final-report.parquet")
    (out / ".part-00007.parquet.tmp").write_bytes(b"left by a killed run")
    embed(tiny_checkpoint, inp, out, shard_size=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-final-report.parquet",
    ]
    assert read_embeddings(out).ids() == [f"doc-{i}" for i in range(6)]
