"""The steps every batch-embed engine shares (the local loop in embed_job.py, the Ray engine in ray_engine.py):
plan the input and prepare the output folder, embed one window, and the job's summary.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bidir_core.embeddings_artifact import MANIFEST, EmbeddingsManifest, shard_name
from bidir_core.errors import BidirError
from bidir_core.matryoshka import offered_dim
from bidir_core.outputs import check_writable
from bidir_serve.backends import Backend, load_backend
from bidir_serve.input_plan import InputPlan, plan_inputs
from bidir_serve.inputs import resolve_inputs
from bidir_serve.job_config import BatchEmbedConfig
from bidir_serve.job_folder import plan_job, prepare_output
from bidir_serve.pipeline import Batch, BatchingConfig, Window
from bidir_serve.ranks import on_rank_zero, process_group
from bidir_serve.unique_ids import check_unique_ids


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


@dataclass(frozen=True)
class Job:
    """What every engine knows before any work: the input plan, the model, and the folder's planned manifest."""

    out: Path
    plan: InputPlan
    backend: Backend
    planned: EmbeddingsManifest
    already: bool
    """Whether the folder already holds the complete job."""


def load_job_backend(cfg: BatchEmbedConfig) -> Backend:
    return load_backend(
        cfg.model, cfg.backend, dim=cfg.dim, device=cfg.device, precision=cfg.precision, compile=cfg.compile
    )


def prepare_job(
    cfg: BatchEmbedConfig,
    rank: int = 0,
    world: int = 1,
    load: Callable[[BatchEmbedConfig], Backend] = load_job_backend,
) -> Job:
    """Plan the input (rank 0; file list and metadata only, or the whole input read once with
    --check-unique-ids), load the model (`load`: the Ray engine describes it from a worker), and prepare the output
    folder (rank 0)."""
    out = Path(cfg.output).expanduser()
    files = resolve_inputs(cfg.input)
    check_writable(out / MANIFEST)  # before the plan and the model load, not after
    with process_group(world):
        plan = on_rank_zero(rank, world, lambda: _plan(cfg, files))
        backend = load(cfg)
        offered_dim(cfg.dim, backend.width, backend.config.matryoshka_dims, "--dim")  # as the server offers
        planned = plan_job(cfg, backend, plan)
        already = on_rank_zero(rank, world, lambda: prepare_output(out, planned, cfg.overwrite))
    return Job(out, plan, backend, planned, already)


def _plan(cfg: BatchEmbedConfig, files: list[Path]) -> InputPlan:
    plan = plan_inputs(files, cfg.id_field, cfg.text_field, cfg.shard_size)
    if cfg.check_unique_ids:
        check_unique_ids(plan, cfg.id_field, cfg.text_field)
    return plan


def batching_config(cfg: BatchEmbedConfig, backend: Backend) -> BatchingConfig:
    return BatchingConfig(
        max_length=backend.config.max_length,
        max_batch_tokens=cfg.max_batch_tokens,
        max_batch_size=cfg.max_batch_size,
        window=cfg.window,
        pad_id=backend.tokenizer.pad_token_id,
        pin_memory=backend.pin_memory,
    )


def embed_window(backend: Backend, window: Window, out: Path, model: str) -> np.ndarray:
    """The window's (rows, dim) float32 embeddings in input order; non-finite values are an error."""
    emb = np.empty((len(window.ids), backend.dim), np.float32)
    for batch in window.batches:
        part = backend.embed(batch.input_ids, batch.attention_mask)  # (B, dim)
        _check_finite(part, window, batch, out, model)
        emb[batch.positions] = part
    return emb


def warn_truncated(truncated: int, backend: Backend) -> None:
    if truncated:
        warnings.warn(
            f"{truncated} rows were longer than max_length={backend.config.max_length} tokens and were truncated",
            stacklevel=3,
        )


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
