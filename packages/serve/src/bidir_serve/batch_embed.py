"""batch-embed: embed a corpus (JSONL, Parquet or plain text) into the embeddings artifact, resumably.

Library: embed_corpus(BatchEmbedConfig(...)). CLI: `batch-embed ...` or `python -m bidir_serve.batch_embed ...`;
under `torchrun --nproc-per-node N -m bidir_serve.batch_embed ...` the shards are split by global rank.

Exactness. The inputs are read once before any work (bad rows and duplicate ids stop the job there). Shard k holds
input rows [k * shard_size, (k + 1) * shard_size) and appears only when complete (temp name + rename), so after a
kill, a rerun skips the shards that exist intact (readable, with their planned row count; a complete job's shards are
checked too) and computes the others: every id ends up exactly once. Non-finite embeddings stop the job before the
shard is written. The manifest
carries a fingerprint of the inputs (paths, sizes, mtimes), the settings and the model; a rerun whose fingerprint
differs refuses to mix its rows with the old ones unless --overwrite is given.

Several processes. Rank r computes shards k with k % world_size == r. Rank 0 prepares the output folder (checks
the fingerprint, clears it on --overwrite, writes the manifest marked incomplete) while the others wait (a gloo
barrier); then each rank writes its shards, and whichever rank finds every shard present after writing its own
marks the manifest complete (the last one to finish always does; two doing it write the same file).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bidir_core.embeddings_artifact import (
    EMBEDDING_DTYPES,
    MANIFEST,
    EmbeddingsManifest,
    Shard,
    ShardWriter,
    read_embeddings_manifest,
    shard_name,
    write_embeddings_manifest,
)
from bidir_core.errors import BidirError, one_line
from bidir_core.outputs import check_writable
from bidir_serve.backends import BACKENDS, PRECISIONS, load_backend
from bidir_serve.inputs import input_fingerprint, iter_rows, resolve_inputs, scan
from bidir_serve.pipeline import Batch, BatchingConfig, WindowDone, prefetch, shard_batches

PROMPTS = ("passage", "query", "none")


@dataclass(frozen=True)
class BatchEmbedConfig:
    """One batch-embed job."""

    model: str
    """A checkpoint folder, a .gguf file, the embedded default 'smollm2-135m', an ONNX export or an engine folder."""
    input: str
    """A JSONL, Parquet or plain-text file, or a glob of them (files are taken in sorted order)."""
    output: str
    """The embeddings folder to write (created; resumed when it holds an unfinished job with the same fingerprint)."""
    id_field: str = "id"
    """JSONL key / Parquet column of the row id (plain text: the line number)."""
    text_field: str = "text"
    """JSONL key / Parquet column of the text."""
    prompt: str = "passage"
    """Which of the model's prefixes to prepend: passage, query or none."""
    dim: int | None = None
    """Matryoshka dimension to truncate to (re-normalized); None keeps the model's full width."""
    dtype: str = "float32"
    """Storage dtype of the embeddings: float32 or float16."""
    shard_size: int = 100_000
    """Rows per Parquet shard (the unit of resumption and of work split between ranks)."""
    backend: str = "auto"
    """auto, torch, onnxruntime or tensorrt (auto: see bidir_serve.backends)."""
    device: str | None = None
    """cpu or cuda (None: cuda when available)."""
    precision: str | None = None
    """torch backend compute dtype: fp32, bf16 or fp16 (None: bf16 on CUDA, fp32 on CPU)."""
    compile: bool = False
    """torch backend: torch.compile the model (dynamic shapes)."""
    max_batch_tokens: int = 16384
    """Upper bound on rows x longest row (padded tokens) of a batch."""
    max_batch_size: int = 128
    """Upper bound on rows per batch."""
    window: int = 4096
    """Rows sorted by length together; memory is bounded by the window, whatever the corpus or shard size."""
    prefetch: int = 8
    """Batches tokenized ahead of the model (the bounded queue between the tokenizer thread and the model)."""
    overwrite: bool = False
    """Replace existing embeddings in `output` (of other inputs or settings, or complete ones) instead of refusing."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise BidirError(f"prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")
        if self.dtype not in EMBEDDING_DTYPES:
            raise BidirError(f"dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise BidirError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BidirError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("shard_size", "max_batch_tokens", "max_batch_size", "window", "prefetch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BidirError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EmbedSummary:
    """What a call of embed_corpus did (on this rank)."""

    output: Path
    rows: int
    """Rows of the whole input."""
    rows_embedded: int
    """Rows this call (this rank) embedded; the rest were done by an earlier run or by other ranks."""
    tokens: int
    """Real tokens this call embedded (prefixes included, padding excluded)."""
    truncated: int
    """Rows this call cut to max_length."""
    shards_written: int
    seconds: float
    complete: bool
    """Whether the artifact is complete (every shard written, manifest marked complete)."""

    def line(self) -> str:
        rate = self.rows_embedded / max(self.seconds, 1e-9)
        tok_rate = self.tokens / max(self.seconds, 1e-9)
        state = "complete" if self.complete else "incomplete (other ranks still running)"
        return (
            f"batch-embed: {self.rows_embedded} of {self.rows} rows embedded, {self.tokens} tokens, "
            f"{self.truncated} truncated, {self.shards_written} shards, {self.seconds:.1f} s "
            f"({rate:.1f} rows/s, {tok_rate:.0f} tokens/s) -> {self.output} [{state}]"
        )


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _job_fingerprint(inputs_fp: str, settings: dict) -> str:
    blob = json.dumps({"inputs": inputs_fp, "settings": settings}, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _our_files(folder: Path) -> list[Path]:
    return [*folder.glob("part-*.parquet"), *folder.glob(".part-*.parquet.tmp"), folder / MANIFEST]


def _prepare_output(out: Path, planned: EmbeddingsManifest, overwrite: bool) -> bool:
    """Check or create the output folder; write the planned (incomplete) manifest. True if already complete."""
    if out.exists() and not out.is_dir():
        raise BidirError(f"{out}: exists and is not a folder")
    if (out / MANIFEST).is_file():
        old = read_embeddings_manifest(out)
        same = (old.input_fingerprint, old.model_fingerprint) == (
            planned.input_fingerprint,
            planned.model_fingerprint,
        )
        if overwrite:
            for path in _our_files(out):
                path.unlink(missing_ok=True)
        elif not same:
            what = "model" if old.model_fingerprint != planned.model_fingerprint else "inputs or settings"
            raise BidirError(
                f"{out}: holds embeddings of other {what} (fingerprint differs); "
                "pass --overwrite to replace them, or choose another output folder"
            )
        # A rerun checks the shards it claims: one deleted or damaged since is computed again.
        elif old.complete and all(_done(out, s) for s in planned.shards):
            return True
    elif out.is_dir() and any(out.iterdir()):
        raise BidirError(
            f"{out}: not empty and not an embeddings folder (no {MANIFEST}); choose another folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_embeddings_manifest(out, planned)
    return False


def _done(out: Path, shard: Shard) -> bool:
    """Whether the shard exists, its Parquet footer reads and holds the planned row count (anything else is computed
    again)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = out / shard.name
    try:
        return path.is_file() and pq.read_metadata(path).num_rows == shard.rows
    except (OSError, pa.ArrowException):  # not Parquet (e.g. damaged by hand): recompute it
        return False


def _finish(out: Path, planned: EmbeddingsManifest) -> bool:
    """Mark the manifest complete if every shard exists. True if complete."""
    if not all(_done(out, s) for s in planned.shards):
        return False
    write_embeddings_manifest(out, dataclasses.replace(planned, complete=True))
    for tmp in out.glob(".part-*.parquet.tmp"):  # left by a killed run of a shard that is now complete
        tmp.unlink(missing_ok=True)
    return True


def _check_finite(emb: np.ndarray, batch: Batch, out: Path, model: str) -> None:
    """nan/inf embeddings (a NaN checkpoint, a garbled export, fp16 overflow) stop the job before the shard is
    written: a shard of NaNs marked complete would pass for a result."""
    bad = ~np.isfinite(emb).all(axis=1)  # (B,)
    if bad.any():
        rows = [batch.wheres[i] for i in np.flatnonzero(bad)]
        raise BidirError(
            f"{out / shard_name(batch.shard)}: the model ({model}) produced non-finite (nan/inf) embeddings for "
            f"{len(rows)} of the {len(emb)} rows of a batch, the first at {rows[0]}; nothing of this shard was "
            "written (check the model: NaN weights, a broken export, fp16 overflow: try --precision bf16 or fp32)"
        )


def _coordinate(rank: int, world: int, prepare) -> bool:
    """Run prepare() on rank 0 only, the other ranks waiting for it; every rank gets its result (or its error)."""
    if world == 1:
        return prepare()
    import torch.distributed as dist

    # gloo (CPU) is enough: only this small setup message crosses processes; shards go through the filesystem.
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    result: list = [None]
    if rank == 0:
        try:
            result = [("ok", prepare())]
        except BidirError as e:
            result = [("error", str(e))]
    dist.broadcast_object_list(result, src=0)
    if own:
        dist.destroy_process_group()
    status, value = result[0]
    if status == "error":
        raise BidirError(value)
    return value


def embed_corpus(cfg: BatchEmbedConfig) -> EmbedSummary:
    """Embed every row of cfg.input into the embeddings artifact at cfg.output (see the module docstring)."""
    start = time.perf_counter()
    rank, world = _rank_world()
    out = Path(cfg.output).expanduser()
    files = resolve_inputs(cfg.input)
    check_writable(out / MANIFEST)  # before the scan and the model load, not after
    n_rows = scan(files, cfg.id_field, cfg.text_field)  # bad rows and duplicate ids, before any work
    backend = load_backend(
        cfg.model,
        cfg.backend,
        dim=cfg.dim,
        device=cfg.device,
        precision=cfg.precision,
        compile=cfg.compile,
    )
    prefix = {"passage": backend.config.passage_prefix, "query": backend.config.query_prefix, "none": ""}[
        cfg.prompt
    ]
    inputs_fp, described = input_fingerprint(files)
    # Everything that changes an embedding value or a row's place; batch sizes and device do not.
    settings = {
        "inputs": described,
        "id_field": cfg.id_field,
        "text_field": cfg.text_field,
        "prompt": cfg.prompt,
        "prefix": prefix,
        "dim": backend.dim,
        "dtype": cfg.dtype,
        "shard_size": cfg.shard_size,
        "backend": backend.name,
        "precision": backend.precision,
        "max_length": backend.config.max_length,
        # the checkpoint behind the model (an export's source): bidir-eval checks it is the model it evaluates
        "source_fingerprint": backend.source_fingerprint,
    }
    n_shards = (n_rows + cfg.shard_size - 1) // cfg.shard_size
    planned = EmbeddingsManifest(
        model=str(cfg.model),
        model_fingerprint=backend.fingerprint,
        dim=backend.dim,
        dtype=cfg.dtype,
        normalize=backend.config.normalize,
        prompt=cfg.prompt,
        prefix=prefix,
        input_fingerprint=_job_fingerprint(inputs_fp, settings),
        settings=settings,
        shards=tuple(
            Shard(shard_name(k), min(cfg.shard_size, n_rows - k * cfg.shard_size)) for k in range(n_shards)
        ),
    )
    already = _coordinate(rank, world, lambda: _prepare_output(out, planned, cfg.overwrite))
    summary = dict(output=out, rows=n_rows, rows_embedded=0, tokens=0, truncated=0, shards_written=0)
    if already:
        return EmbedSummary(**summary, seconds=time.perf_counter() - start, complete=True)

    todo = {k for k, s in enumerate(planned.shards) if k % world == rank and not _done(out, s)}
    batching = BatchingConfig(
        max_length=backend.config.max_length,
        max_batch_tokens=cfg.max_batch_tokens,
        max_batch_size=cfg.max_batch_size,
        window=cfg.window,
        pad_id=backend.tokenizer.pad_token_id,
        pin_memory=backend.pin_memory,
    )
    from tqdm.auto import tqdm

    items = shard_batches(
        iter_rows(files, cfg.id_field, cfg.text_field),
        cfg.shard_size,
        todo,
        backend.tokenizer,
        prefix,
        batching,
    )
    total = sum(planned.shards[k].rows for k in todo)
    writer: ShardWriter | None = None
    window: np.ndarray | None = None  # (window rows, dim) float32: the current window's embeddings
    t0 = time.perf_counter()
    bar = tqdm(total=total, disable=not cfg.progress or rank != 0, unit="row", desc="batch-embed")
    try:
        for item in prefetch(items, cfg.prefetch):
            if isinstance(item, Batch):
                if window is None:
                    window = np.empty((item.window_rows, backend.dim), np.float32)
                emb = backend.embed(item.input_ids, item.attention_mask)  # (B, dim)
                _check_finite(emb, item, out, cfg.model)
                window[item.positions] = emb
                summary["tokens"] += item.tokens
                summary["rows_embedded"] += len(item.positions)
                bar.update(len(item.positions))
                bar.set_postfix_str(
                    f"{summary['tokens'] / (time.perf_counter() - t0):.0f} tokens/s", refresh=False
                )
            elif isinstance(item, WindowDone):
                writer = writer or ShardWriter(out, item.shard, backend.dim, cfg.dtype)
                writer.write(item.ids, window)  # the window's rows, back in input order
                summary["truncated"] += item.truncated
                window = None
            else:
                writer.close()  # the shard appears under its final name only now
                writer = None
                summary["shards_written"] += 1
    finally:
        bar.close()
        if writer is not None:  # failed or interrupted mid-shard: no partial shard is left behind
            writer.abort()
    if summary["truncated"]:
        warnings.warn(
            f"{summary['truncated']} rows were longer than max_length={backend.config.max_length} tokens "
            "and were truncated",
            stacklevel=2,
        )
    complete = _finish(out, planned)
    return EmbedSummary(**summary, seconds=time.perf_counter() - start, complete=complete)


EXAMPLES = """examples:
  batch-embed --model smollm2-135m --input corpus.jsonl --output corpus-emb/
  batch-embed --model ./ckpt --input 'docs/*.parquet' --id-field doc_id --text-field body --output emb/ --dtype float16
  batch-embed --model ./onnx-export --input lines.txt --output emb/ --prompt query --dim 256
  torchrun --nproc-per-node 8 -m bidir_serve.batch_embed --model ./engine --input 'shards/*.jsonl' --output emb/"""


def parse_args(argv: list[str] | None = None) -> BatchEmbedConfig:
    p = argparse.ArgumentParser(
        prog="batch-embed",
        description="Embed a corpus (JSONL, Parquet or plain text, one document per line) into Parquet shards "
        "plus manifest.json. Resumable: rerun the same command after a kill to finish the job.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = BatchEmbedConfig("", "", "")
    p.add_argument(
        "--model", required=True, help="checkpoint folder, .gguf, 'smollm2-135m', ONNX export or engine"
    )
    p.add_argument("--input", required=True, help="a .jsonl, .parquet or text file, or a glob (quote it)")
    p.add_argument("--output", required=True, help="the embeddings folder to write")
    p.add_argument(
        "--id-field", default=d.id_field, help="id key/column (default id; text files: line number)"
    )
    p.add_argument("--text-field", default=d.text_field, help="text key/column (default text)")
    p.add_argument("--prompt", choices=PROMPTS, default=d.prompt, help="prefix to prepend (default passage)")
    p.add_argument("--dim", type=int, help="Matryoshka dimension to truncate to (default: full width)")
    p.add_argument(
        "--dtype", choices=EMBEDDING_DTYPES, default=d.dtype, help="storage dtype (default float32)"
    )
    p.add_argument(
        "--shard-size", type=int, default=d.shard_size, help=f"rows per shard (default {d.shard_size})"
    )
    p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="runtime (default auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        help="torch compute dtype (default bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch backend: torch.compile the model")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, help="padded tokens per batch")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="rows per batch")
    p.add_argument("--window", type=int, default=d.window, help="rows sorted by length together")
    p.add_argument(
        "--overwrite", action="store_true", help="replace embeddings of other inputs/settings in --output"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    fields = {k: v for k, v in vars(a).items() if k != "no_progress"}
    return BatchEmbedConfig(**fields, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        summary = embed_corpus(cfg)
    except (BidirError, OSError) as e:  # OSError: an unreadable input or an unwritable output
        print(f"batch-embed: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
