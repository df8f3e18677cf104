"""embed_corpus: the batch-embed job, from the inputs to a complete embeddings folder (see job_folder.py for what
the folder holds and how a rerun resumes it, ranks.py for several processes).

The inputs are read once before any work (bad rows and duplicate ids stop the job there). Then this rank's missing
shards are computed window by window: the model embeds each batch of a window, the window goes back to input order
and is appended to its shard, and a shard gets its final name when its last window is in. Non-finite embeddings
stop the job before the shard is written. Whichever rank finds every shard present after writing its own marks the
manifest complete (the last one to finish always does).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bidir_core.embeddings_artifact import MANIFEST, ShardWriter, shard_name
from bidir_core.errors import BidirError
from bidir_core.outputs import check_writable
from bidir_serve.backends import load_backend
from bidir_serve.inputs import iter_rows, resolve_inputs, scan
from bidir_serve.job_config import BatchEmbedConfig
from bidir_serve.job_folder import finish, plan_job, prepare_output, shard_done
from bidir_serve.pipeline import Batch, BatchingConfig, Window, prefetch, shard_windows
from bidir_serve.ranks import on_rank_zero, rank_world


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


def embed_corpus(cfg: BatchEmbedConfig) -> EmbedSummary:
    """Embed every row of cfg.input into the embeddings artifact at cfg.output (see the module docstring)."""
    start = time.perf_counter()
    rank, world = rank_world()
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
    planned = plan_job(cfg, backend, files, n_rows)
    already = on_rank_zero(rank, world, lambda: prepare_output(out, planned, cfg.overwrite))
    summary = dict(output=out, rows=n_rows, rows_embedded=0, tokens=0, truncated=0, shards_written=0)
    if already:
        return EmbedSummary(**summary, seconds=time.perf_counter() - start, complete=True)

    todo = {k for k, s in enumerate(planned.shards) if k % world == rank and not shard_done(out, s)}
    batching = BatchingConfig(
        max_length=backend.config.max_length,
        max_batch_tokens=cfg.max_batch_tokens,
        max_batch_size=cfg.max_batch_size,
        window=cfg.window,
        pad_id=backend.tokenizer.pad_token_id,
        pin_memory=backend.pin_memory,
    )
    rows = iter_rows(files, cfg.id_field, cfg.text_field)
    windows = shard_windows(rows, cfg.shard_size, todo, backend.tokenizer, planned.prefix, batching)
    total = sum(planned.shards[k].rows for k in todo)
    writer: ShardWriter | None = None
    t0 = time.perf_counter()
    bar = tqdm(total=total, disable=not cfg.progress or rank != 0, unit="row", desc="batch-embed")
    try:
        for window in prefetch(windows, cfg.prefetch):
            emb = np.empty((len(window.ids), backend.dim), np.float32)  # the window's embeddings, input order
            for batch in window.batches:
                part = backend.embed(batch.input_ids, batch.attention_mask)  # (B, dim)
                _check_finite(part, window, batch, out, cfg.model)
                emb[batch.positions] = part
                summary["tokens"] += batch.tokens
                summary["rows_embedded"] += len(batch.positions)
                bar.update(len(batch.positions))
                bar.set_postfix_str(
                    f"{summary['tokens'] / (time.perf_counter() - t0):.0f} tokens/s", refresh=False
                )
            writer = writer or ShardWriter(out, window.shard, backend.dim, cfg.dtype)
            writer.write(window.ids, emb)
            summary["truncated"] += window.truncated
            if window.last_in_shard:
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
    complete = finish(out, planned)
    return EmbedSummary(**summary, seconds=time.perf_counter() - start, complete=complete)


def _check_finite(emb: np.ndarray, window: Window, batch: Batch, out: Path, model: str) -> None:
    """nan/inf embeddings (a NaN checkpoint, a garbled export, fp16 overflow) stop the job before the shard is
    written: a shard of NaNs marked complete would pass for a result."""
    bad = ~np.isfinite(emb).all(axis=1)  # (B,)
    if bad.any():
        rows = [window.wheres[batch.positions[i]] for i in np.flatnonzero(bad)]
        raise BidirError(
            f"{out / shard_name(window.shard)}: the model ({model}) produced non-finite (nan/inf) embeddings for "
            f"{len(rows)} of the {len(emb)} rows of a batch, the first at {rows[0]}; nothing of this shard was "
            "written (check the model: NaN weights, a broken export, fp16 overflow: try --precision bf16 or fp32)"
        )
