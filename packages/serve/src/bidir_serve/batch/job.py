"""What every batch-embed engine (the local loop in engine.py, ray_engine.py) starts from and reports: the job
(the input planned, the model loaded, the output folder prepared) and the summary of what a run did.

Several processes (torchrun) on one job: rank r computes shards k with k % world_size == r. Rank 0 plans the input
and prepares the output folder while the others wait (a gloo barrier, the only message between processes: shards go
through the filesystem).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bidir_core.embeddings_artifact import MANIFEST, EmbeddingsManifest
from bidir_core.errors import BidirError
from bidir_core.matryoshka import offered_dim
from bidir_core.outputs import check_writable
from bidir_serve.backends import Backend, load_backend
from bidir_serve.batch.config import BatchEmbedConfig
from bidir_serve.batch.folder import plan_job, prepare_output
from bidir_serve.batch.plan import InputPlan, plan_inputs, resolve_inputs
from bidir_serve.batch.unique_ids import check_unique_ids

T = TypeVar("T")


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


def load_job_backend(cfg: BatchEmbedConfig, load: Callable[..., Backend] = load_backend) -> Backend:
    """The job's backend, its output cut to --dim: how every engine loads it (`load`: load_backend, or a test's)."""
    return load(cfg.backend_spec, dim=cfg.dim)


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


def rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) for a single process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(world: int) -> Iterator[None]:
    """A gloo process group for the setup steps of a job of `world` ranks (none for one process): one for several
    on_rank_zero calls, since a second group made after the first is destroyed can fail to connect."""
    import torch.distributed as dist

    own = world > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


def on_rank_zero(rank: int, world: int, prepare: Callable[[], T]) -> T:
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
