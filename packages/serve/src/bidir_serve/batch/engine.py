"""embed_corpus: the batch-embed job, from the inputs to a complete embeddings folder, run by the engine its config
names: here (this process, or each torchrun rank), or on a Ray cluster (ray_engine.py).

Either engine plans the input first (plan.py: row counts, where each shard starts; no row kept) and prepares the
output folder (folder.py: what it holds, how a rerun resumes it), on rank 0 (job.py). Here, shard k is this rank's
when k % world == rank; each missing one is read (only its slice of the input) and computed window by window
(windows.py): rows are validated as they are read (a bad row or a duplicate id within the shard stops the job,
naming file and line, before that shard is published), the model embeds each batch of a window, the window goes back
to input order and is appended to its shard, and a shard gets its final name when its last window is in. Non-finite
embeddings stop the job before the shard is written. Whichever rank finds every shard present after writing its own
marks the manifest complete (the last one to finish always does).
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from bidir_core.embeddings_artifact import ShardWriter
from bidir_serve.batch.config import BatchEmbedConfig
from bidir_serve.batch.folder import finish, shard_done
from bidir_serve.batch.job import EmbedSummary, prepare_job, rank_world
from bidir_serve.batch.plan import shard_rows
from bidir_serve.batch.windows import batching_config, embed_window, prefetch, shard_windows, warn_truncated

__all__ = ["EmbedSummary", "embed_corpus"]


def embed_corpus(cfg: BatchEmbedConfig) -> EmbedSummary:
    """Embed every row of cfg.input into the embeddings artifact at cfg.output (see the module docstring)."""
    if cfg.engine == "ray":
        # imports ray, or says which package to install: only a Ray job needs it
        from bidir_serve.batch.ray_engine import embed_corpus_ray

        return embed_corpus_ray(cfg)
    start = time.perf_counter()
    rank, world = rank_world()
    job = prepare_job(cfg, rank, world)
    out, plan, backend, planned = job.out, job.plan, job.backend, job.planned
    summary = dict(output=out, rows=plan.rows, rows_embedded=0, tokens=0, truncated=0, shards_written=0)
    if job.already:
        return EmbedSummary(**summary, seconds=time.perf_counter() - start, complete=True)

    todo = [k for k in range(len(planned.shards)) if k % world == rank and not shard_done(out, planned, k)]
    shards = ((k, shard_rows(plan, k, cfg.id_field, cfg.text_field)) for k in todo)
    batching = batching_config(cfg, backend)
    # backend.prepare runs on the producer thread (prefetch), ahead of the model
    windows = shard_windows(shards, backend.tokenizer, planned.prefix, batching, backend.prepare)
    total = sum(planned.shards[k].rows for k in todo)
    writer: ShardWriter | None = None
    t0 = time.perf_counter()
    bar = None  # made at the first window, so an error met in the first rows is the only line printed
    try:
        for window in prefetch(windows, cfg.prefetch):
            bar = bar or tqdm(
                total=total, disable=not cfg.progress or rank != 0, unit="row", desc="batch-embed"
            )
            emb = embed_window(backend, window, out, cfg.model)
            summary["tokens"] += sum(b.tokens for b in window.batches)
            summary["rows_embedded"] += len(window.ids)
            bar.update(len(window.ids))
            bar.set_postfix_str(
                f"{summary['tokens'] / (time.perf_counter() - t0):.0f} tokens/s", refresh=False
            )
            writer = writer or ShardWriter(
                out, window.shard, backend.dim, cfg.dtype, planned.input_fingerprint
            )
            writer.write(window.ids, emb)
            summary["truncated"] += window.truncated
            if window.last_in_shard:
                writer.close()  # the shard appears under its final name only now
                writer = None
                summary["shards_written"] += 1
    except BaseException:
        if bar is not None:
            bar.leave = False  # the error is the last line, not a bar stopped mid-way
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:  # failed or interrupted mid-shard: no partial shard is left behind
            writer.abort()
    warn_truncated(summary["truncated"], backend)
    complete = finish(out, planned, plan)
    return EmbedSummary(**summary, seconds=time.perf_counter() - start, complete=complete)
