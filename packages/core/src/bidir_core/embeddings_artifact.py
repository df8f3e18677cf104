"""The embeddings artifact: what batch-embed writes and every consumer reads.

    <embeddings>/  part-00000.parquet, part-00001.parquet, ...   columns id (string), embedding (fixed-size list of
                                                                 float32 or float16, `dim` wide)
                   manifest.json                                 EmbeddingsManifest

A shard is written under a hidden temporary name and renamed when complete, so a `part-*.parquet` file is never
half-written. The manifest is written when a job starts (complete: false, the planned shards) and rewritten with
complete: true once every shard exists; read_embeddings refuses an incomplete folder unless asked not to. A shard
batch-embed writes carries its index and the job's input fingerprint in its footer (key-value metadata
bidir.shard, bidir.job), so one copied over another of the same row count is refused (check_shard_tag).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bidir_core.errors import BidirError, one_line
from bidir_core.file_writes import fsync_dir, fsync_file
from bidir_core.jsonfile import parse_fields, read_versioned_json, write_json_atomic

EMBEDDINGS_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KIND = "embeddings"
EMBEDDING_DTYPES = ("float32", "float16")


def shard_name(index: int) -> str:
    """part-00000.parquet, part-00001.parquet, ..."""
    return f"part-{index:05d}.parquet"


_SHARD = re.compile(r"part-\d{5,}\.parquet")
_SHARD_TMP = re.compile(r"\.part-\d{5,}\.parquet\.tmp")


def is_shard_name(name: str) -> bool:
    """Whether a file name is one shard_name() gives (a user's part-notes.parquet is not)."""
    return _SHARD.fullmatch(name) is not None


def is_shard_temp_name(name: str) -> bool:
    """Whether a file name is a ShardWriter's temporary name (.part-00000.parquet.tmp)."""
    return _SHARD_TMP.fullmatch(name) is not None


@dataclass(frozen=True)
class Shard:
    """One Parquet file of the artifact."""

    name: str
    """File name inside the folder, e.g. part-00000.parquet."""
    rows: int
    """Number of rows (ids) it holds."""


@dataclass(frozen=True)
class EmbeddingsManifest:
    """manifest.json of an embeddings folder."""

    model: str
    """The model as given to batch-embed (a checkpoint folder, an export folder or a name)."""
    model_fingerprint: str
    """A fingerprint of the model's weights and settings (sha256), so embeddings of different models never mix."""
    dim: int
    """Width of every embedding (the model's hidden size, or the Matryoshka dimension asked for)."""
    dtype: str
    """Storage dtype of the embedding column: float32 or float16."""
    normalize: bool
    """Whether embeddings are L2-normalized (dot product = cosine similarity)."""
    prompt: str
    """Which prefix was prepended to each text: passage, query or none."""
    prefix: str
    """The prefix string itself (e.g. "passage: "), empty for none."""
    input_fingerprint: str
    """sha256 of the inputs (paths, sizes, modification times) and of every setting that changes the output."""
    settings: dict = dataclasses.field(default_factory=dict)
    """The settings that went into input_fingerprint (fields, shard size, backend, precision, ...), for people."""
    shards: tuple[Shard, ...] = ()
    """Every shard of the artifact, in row order; their rows add up to total_rows."""
    complete: bool = False
    """True once every shard is written; a folder with complete false is a job in progress (or killed)."""

    def __post_init__(self):
        if self.dtype not in EMBEDDING_DTYPES:
            raise BidirError(f"dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise BidirError(f"dim must be a positive integer, got {self.dim!r}")
        object.__setattr__(self, "shards", tuple(self.shards))

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> dict:
        return {
            "format_version": EMBEDDINGS_FORMAT_VERSION,
            "kind": KIND,
            **dataclasses.asdict(self),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "total_rows": self.total_rows,
        }


def write_embeddings_manifest(folder: str | Path, manifest: EmbeddingsManifest) -> Path:
    """Write folder/manifest.json atomically (a temp file, fsynced, renamed into place; then the folder fsynced)."""
    path = Path(folder) / MANIFEST
    try:
        write_json_atomic(path, manifest.to_json())
    except OSError as e:  # e.g. the disk is full
        raise BidirError(f"{path}: cannot write ({one_line(e)})") from None
    return path


SHARD_KEY = b"bidir.shard"
JOB_KEY = b"bidir.job"


def check_shard_tag(path: Path, metadata, index: int, job: str, required: bool = False) -> None:
    """A BidirError unless the shard at `path` (its Parquet footer's FileMetaData) says it is shard `index` of the
    job whose manifest input_fingerprint is `job`: a shard copied over another of the same row count, or from
    another job's folder, is caught from the footer alone. required: a shard with no tag (another writer's, or an
    older version's) fails too, instead of passing unchecked."""
    tags = metadata.metadata or {}
    if SHARD_KEY not in tags or JOB_KEY not in tags:
        if required:
            raise BidirError(f"{path}: no shard tag (not written by this version for this job)")
        return
    tagged = tags[SHARD_KEY].decode()
    if tagged != str(index):
        raise BidirError(
            f"{path}: holds shard {tagged} of this job, not shard {index} (copied or renamed by hand?); rerun the "
            "job to compute it again"
        )
    if tags[JOB_KEY].decode() != job:
        raise BidirError(
            f"{path}: a shard of another job (its input fingerprint is not the manifest's); rerun the job to "
            "compute it again"
        )


class ShardWriter:
    """Writes shard `index` a block of rows at a time (one Parquet row group each), so memory stays bounded by the
    block whatever the shard size; the file gets its final name only in close(). Use as a context manager: leaving
    it on an exception removes the temp file and leaves no shard. job: the manifest's input_fingerprint; with it,
    the footer is tagged with the shard's index and job (check_shard_tag)."""

    def __init__(self, folder: str | Path, index: int, dim: int, dtype: str, job: str = ""):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"dtype must be one of {EMBEDDING_DTYPES}, got {dtype!r}")
        self.path = Path(folder) / shard_name(index)
        # One writer per shard index (ranks own disjoint shards), so a fixed temp name is enough; a stale one left
        # by a killed job is simply overwritten.
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.dim, self.dtype, self.rows = dim, np.dtype(dtype), 0
        value = pa.from_numpy_dtype(self.dtype)
        tags = {SHARD_KEY: str(index).encode(), JOB_KEY: job.encode()} if job else None
        self.schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(value, dim))], metadata=tags)
        try:
            self._writer = pq.ParquetWriter(self.tmp, self.schema)
        except (OSError, pa.ArrowException) as e:
            raise BidirError(f"{self.tmp}: cannot write ({one_line(e)})") from None

    def write(self, ids: Sequence[str], embeddings: np.ndarray) -> None:
        """Append rows: ids and their embeddings (n, dim), cast to the shard's dtype."""
        import pyarrow as pa

        if embeddings.shape != (len(ids), self.dim):
            raise ValueError(f"embeddings must be ({len(ids)}, {self.dim}), got {embeddings.shape}")
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=self.dtype).reshape(-1))
        columns = [pa.array(list(ids), type=pa.string()), pa.FixedSizeListArray.from_arrays(flat, self.dim)]
        try:
            self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        except (OSError, pa.ArrowException) as e:  # e.g. the disk is full: name the file
            raise BidirError(f"{self.tmp}: cannot write ({one_line(e)})") from None
        self.rows += len(ids)

    def close(self) -> Path:
        """Finish the file, fsync it, rename it to its final name and fsync the folder: a shard that has its final
        name survives a power loss whole (without the first fsync the rename could reach the disk before the data)."""
        import pyarrow as pa

        try:
            self._writer.close()
            fsync_file(self.tmp)
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except (OSError, pa.ArrowException) as e:
            raise BidirError(f"{self.tmp}: cannot write ({one_line(e)})") from None
        return self.path

    def abort(self) -> None:
        import pyarrow as pa

        # the error being handled (a full disk) may strike again here
        with contextlib.suppress(OSError, pa.ArrowException):
            self._writer.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(folder: str | Path, index: int, ids: Sequence[str], embeddings: np.ndarray) -> Path:
    """Write shard `index` (ids, embeddings (N, D) float32 or float16) at once, atomically."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got {embeddings.shape}")
    with ShardWriter(folder, index, embeddings.shape[1], str(embeddings.dtype)) as writer:
        writer.write(ids, embeddings)
    return writer.path


@dataclass(frozen=True)
class Embeddings:
    """A validated embeddings folder: its manifest and iteration over its shards."""

    folder: Path
    manifest: EmbeddingsManifest

    def __len__(self) -> int:
        return self.manifest.total_rows

    def iter_shards(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, embeddings (n, dim) in the stored dtype) per shard, in row order."""
        import pyarrow.parquet as pq

        for shard in self.manifest.shards:
            table = pq.read_table(self.folder / shard.name)
            ids = table.column("id").to_pylist()
            flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            yield ids, flat.reshape(len(ids), self.manifest.dim)

    def ids(self) -> list[str]:
        return [i for ids, _ in self.iter_shards() for i in ids]

    def embeddings(self) -> np.ndarray:
        """All embeddings, (total_rows, dim), in the stored dtype."""
        parts = [emb for _, emb in self.iter_shards()]
        if not parts:
            return np.zeros((0, self.manifest.dim), dtype=self.manifest.dtype)
        return np.concatenate(parts)


def read_embeddings_manifest(folder: str | Path) -> EmbeddingsManifest:
    """manifest.json of an embeddings folder (complete or not), checked for version and fields."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BidirError(f"{folder}: no {MANIFEST} (not an embeddings folder)")
    raw = read_versioned_json(path, EMBEDDINGS_FORMAT_VERSION)
    if raw.pop("kind", None) != KIND:
        raise BidirError(f"{path}: not an embeddings manifest (kind is not {KIND!r})")
    raw.pop("total_rows", None)  # derived from the shards
    shards = raw.pop("shards", ())
    return parse_fields(path, lambda: EmbeddingsManifest(**raw, shards=tuple(Shard(**s) for s in shards)))


def read_embeddings(folder: str | Path, require_complete: bool = True) -> Embeddings:
    """The one reader of an embeddings folder: checks the manifest, that every shard exists with its row count,
    and that each shard's columns are id (string) and embedding (fixed-size list of dim x dtype)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest = read_embeddings_manifest(folder)
    if require_complete and not manifest.complete:
        done = sum((folder / s.name).is_file() for s in manifest.shards)
        raise BidirError(
            f"{folder}: incomplete ({done} of {len(manifest.shards)} shards written); rerun the job to finish it"
        )
    value_type = pa.from_numpy_dtype(np.dtype(manifest.dtype))
    for k, shard in enumerate(manifest.shards):
        path = folder / shard.name
        if not path.is_file():
            if require_complete:
                raise BidirError(f"{folder}: manifest names {shard.name}, which is missing")
            continue
        try:
            meta = pq.read_metadata(path)
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as e:
            raise BidirError(f"{path}: not a readable Parquet file ({one_line(e)})") from None
        if meta.num_rows != shard.rows:
            raise BidirError(f"{path}: {meta.num_rows} rows, the manifest says {shard.rows}")
        check_shard_tag(path, meta, k, manifest.input_fingerprint)
        _check_columns(path, schema, value_type, manifest.dim)
    return Embeddings(folder, manifest)


def _check_columns(path: Path, schema, value_type, dim: int) -> None:
    import pyarrow as pa

    types = {name: schema.field(name).type for name in schema.names}
    ok = (
        schema.names == ["id", "embedding"]
        and types["id"] == pa.string()
        and pa.types.is_fixed_size_list(types["embedding"])
        and types["embedding"].list_size == dim
        and types["embedding"].value_type == value_type
    )
    if not ok:
        found = ", ".join(f"{n}: {t}" for n, t in types.items())
        raise BidirError(
            f"{path}: columns ({found}) are not (id: string, embedding: fixed_size_list<{value_type}>[{dim}])"
        )
