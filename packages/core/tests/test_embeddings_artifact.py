"""The embeddings artifact round-trips through its one reader, and bad or incomplete folders are refused."""

import json

import numpy as np
import pytest

from bidir_core import BidirError
from bidir_core.embeddings_artifact import (
    EmbeddingsManifest,
    Shard,
    ShardWriter,
    read_embeddings,
    read_embeddings_manifest,
    shard_name,
    write_embeddings_manifest,
    write_shard,
)


def _manifest(shards, dtype="float32", complete=True, dim=8):
    return EmbeddingsManifest(
        model="/ckpt",
        model_fingerprint="sha256:00",
        dim=dim,
        dtype=dtype,
        normalize=True,
        prompt="passage",
        prefix="passage: ",
        input_fingerprint="sha256:11",
        settings={"shard_size": 3},
        shards=tuple(shards),
        complete=complete,
    )


def _write(folder, n=7, shard_size=3, dtype="float32", dim=8):
    rng = np.random.default_rng(0)
    ids = [f"doc-{i}" for i in range(n)]
    emb = rng.standard_normal((n, dim)).astype(dtype)
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        write_shard(folder, k, ids[start : start + shard_size], emb[start : start + shard_size])
        shards.append(Shard(shard_name(k), len(ids[start : start + shard_size])))
    manifest = _manifest(shards, dtype=dtype, dim=dim)
    write_embeddings_manifest(folder, manifest)
    return ids, emb, manifest


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, dtype):
    ids, emb, manifest = _write(tmp_path, dtype=dtype)
    art = read_embeddings(tmp_path)
    assert art.manifest == manifest
    assert len(art) == 7 and [s.rows for s in manifest.shards] == [3, 3, 1]
    assert art.ids() == ids
    out = art.embeddings()
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, emb)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert json.loads((tmp_path / "manifest.json").read_text())["total_rows"] == 7


def test_incomplete_refused_unless_asked(tmp_path):
    _, _, manifest = _write(tmp_path)
    write_embeddings_manifest(tmp_path, _manifest(manifest.shards, complete=False))
    (tmp_path / "part-00002.parquet").unlink()
    with pytest.raises(BidirError, match=r"incomplete \(2 of 3 shards written\)"):
        read_embeddings(tmp_path)
    assert read_embeddings(tmp_path, require_complete=False).manifest.complete is False


def test_missing_shard_and_wrong_rows(tmp_path):
    _, _, manifest = _write(tmp_path)
    (tmp_path / "part-00001.parquet").unlink()
    with pytest.raises(BidirError, match="part-00001.parquet, which is missing"):
        read_embeddings(tmp_path)
    _write(tmp_path)
    shards = (Shard("part-00000.parquet", 4), *manifest.shards[1:])
    write_embeddings_manifest(tmp_path, _manifest(shards))
    with pytest.raises(BidirError, match="part-00000.parquet: 3 rows, the manifest says 4"):
        read_embeddings(tmp_path)


def test_wrong_columns(tmp_path):
    _, _, manifest = _write(tmp_path, dim=8)
    write_embeddings_manifest(tmp_path, _manifest(manifest.shards, dim=16))
    with pytest.raises(BidirError, match=r"part-00000.parquet: columns .*fixed_size_list<float>\[16\]"):
        read_embeddings(tmp_path)
    write_embeddings_manifest(tmp_path, _manifest(manifest.shards, dtype="float16"))
    with pytest.raises(BidirError, match=r"not \(id: string, embedding: fixed_size_list<halffloat>\[8\]\)"):
        read_embeddings(tmp_path)


def test_bad_manifests(tmp_path):
    with pytest.raises(BidirError, match="no manifest.json"):
        read_embeddings(tmp_path)
    _write(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for change, message in [
        ({"format_version": 99}, "format_version 99"),
        ({"kind": "onnx"}, "not an embeddings manifest"),
        ({"dtype": "int8"}, "dtype must be one of float32, float16"),
        ({"colour": "red"}, "unexpected keyword argument 'colour'"),
    ]:
        (tmp_path / "manifest.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(BidirError, match=message):
            read_embeddings_manifest(tmp_path)


def test_shard_writer_streams_blocks_and_is_atomic(tmp_path):
    """Rows written block by block read back in order; a shard that fails half-way leaves no part-*.parquet."""
    emb = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    with ShardWriter(tmp_path, 3, 4, "float16") as writer:
        writer.write(["a", "b"], emb[:2])
        assert not (tmp_path / "part-00003.parquet").exists()  # not yet complete
        writer.write(["c", "d", "e"], emb[2:])
    write_embeddings_manifest(tmp_path, _manifest([Shard("part-00003.parquet", 5)], dtype="float16", dim=4))
    art = read_embeddings(tmp_path)
    assert art.ids() == list("abcde")
    np.testing.assert_array_equal(art.embeddings(), emb.astype(np.float16))
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path, 4, 4, "float32") as writer:
        writer.write(["a"], emb[:1])
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "part-00003.parquet"]
    with pytest.raises(ValueError, match=r"embeddings must be \(1, 4\)"):
        write_shard(tmp_path, 5, ["a"], np.zeros((2, 4), np.float32))
