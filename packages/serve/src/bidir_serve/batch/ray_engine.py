"""batch-embed --engine ray: the same job on a Ray cluster (Ray Data), for more than one machine.

The driver plans the input and prepares the output folder exactly as the local engine does (job.prepare_job),
so the folder is the same embeddings artifact, shard for shard. Then a Ray dataset of the shards still to do (missing
or incomplete: a rerun after a kill plans only those) flows through two stages:

1. CPU tasks (map_batches with a function, one shard per call): read the shard's slice of the input
   (plan.shard_rows: only its files / row groups / byte range, validated as read, with the same one-line
   errors as local), and tokenize it (prefix, truncation).
2. An actor pool (map_batches with a class): one backend per actor (load_backend, any backend; num_gpus=1 per actor
   on a GPU cluster) embeds the shard window by window in length-sorted batches and writes it with the same
   ShardWriter (temp name, fsync, rename), so every worker writes its shards to the shared output folder itself.

The reading is ours, not read_parquet / read_json / read_text: a shard must be a fixed slice of the input (the same
whatever the cluster), with file:line in every error, which Ray's readers do not give. Actor failures are Ray's
to retry: an actor that dies is restarted (max_restarts) and its shard retried (max_task_retries); an error raised
in the actor that is not ours (a RuntimeError such as a CUDA fault, an OSError) is retried too; a BidirError (bad
input, non-finite embeddings) is not, and ends the job with its one line. A killed driver is recovered by
rerunning the command: finished shards are skipped.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bidir_core.errors import BidirError, one_line
from bidir_serve.backends import load_backend
from bidir_serve.batch.config import BatchEmbedConfig
from bidir_serve.batch.folder import finish, shard_done
from bidir_serve.batch.job import EmbedSummary, load_job_backend, prepare_job, rank_world
from bidir_serve.batch.plan import InputPlan, shard_rows
from bidir_serve.batch.windows import (
    BatchingConfig,
    Window,
    batch_window,
    batching_config,
    embed_window,
    tokenize_rows,
    warn_truncated,
)

CONNECT_TIMEOUT_S = 10.0
"""How long a cluster's address may take to accept a connection before the job gives up on it."""

RETRIES = 3
"""Restarts of a dead actor, and retries of a shard whose actor died or raised a retried error."""

INSTALL = "--engine ray needs Ray: pip install 'bidir-serve[ray]'"


def import_ray():
    """The ray module, or a one-line BidirError naming the package to install."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise BidirError(INSTALL) from None
    return ray


def embed_corpus_ray(cfg: BatchEmbedConfig, *, _load_backend: Callable = load_backend) -> EmbedSummary:
    """embed_corpus on a Ray cluster: cfg.ray_address, or the cluster this process is connected to, or a new local
    one. (_load_backend: what each actor loads its model with; tests inject failures there.)"""
    ray = import_ray()
    start = time.perf_counter()
    if rank_world()[1] > 1:
        raise BidirError("--engine ray runs from one driver process, not under torchrun")
    own = not ray.is_initialized()
    if own:
        _connect(ray, cfg.ray_address)
    try:
        return _run(ray, cfg, start, _load_backend)
    finally:
        if own:
            ray.shutdown()


def _connect(ray, address: str | None) -> None:
    """ray.init(address), but a cluster that does not answer is one line naming its address within
    CONNECT_TIMEOUT_S: ray.init (2.60) has no connect timeout and retries a dead address for minutes, silently."""
    if address and address.startswith("ray://"):  # Ray Client: host:port as given
        named, target = f"--ray-address {address}", address.removeprefix("ray://")
    else:
        named = f"--ray-address {address}" if address else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
        try:
            # where ray.init will connect (Ray's own resolution): RAY_ADDRESS, `auto`'s latest cluster, localhost
            # as the node's address; None: ray.init starts a local cluster (or says itself that `auto` found none)
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(address)
        except ImportError:  # a Ray that moved it: the address as given
            target = address if address and ":" in address else None
        except ConnectionError as e:  # `auto` and no cluster running here
            raise BidirError(f"{named}: {one_line(e)}") from None
        except ValueError as e:
            raise BidirError(
                f"{named}: not a Ray address ({one_line(e)}); expected host:port or auto"
            ) from None
    if target is not None:
        host, _, port = target.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as e:
            raise BidirError(
                f"{named}: no Ray cluster answers at {target} ({one_line(e)}); start one there (ray start "
                "--head) or check the address (ray status on the head node prints it)"
            ) from None
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:  # e.g. `auto` and no cluster running
        raise BidirError(f"{named}: {one_line(e)}") from None


@dataclass(frozen=True)
class BackendInfo:
    """What the driver needs of the model (the manifest's fingerprints and settings, the tokenizer), described by a
    worker with the actors' resources, so a GPU cluster's precision (bf16 under auto) is the one recorded and the
    driver needs no GPU."""

    name: str
    precision: str
    description: str
    config: object
    tokenizer: object
    dim: int
    width: int
    fingerprint: str
    source_fingerprint: str
    max_padding: float | None


def _describe(cfg: BatchEmbedConfig, load: Callable) -> BackendInfo:
    b = load_job_backend(cfg, load)
    fields = (
        "name",
        "precision",
        "description",
        "config",
        "tokenizer",
        "dim",
        "width",
        "fingerprint",
        "source_fingerprint",
        "max_padding",
    )
    return BackendInfo(**{f: getattr(b, f) for f in fields})


def _run(ray, cfg: BatchEmbedConfig, start: float, load: Callable) -> EmbedSummary:
    gpus = _wants_gpu(ray, cfg)
    n_gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and not n_gpus:
        raise BidirError("--device cuda: the Ray cluster has no GPU (ray status lists its resources)")
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    describe = ray.remote(**resources)(_describe)
    job = prepare_job(cfg, load=lambda cfg: ray.get(describe.remote(cfg, load)))
    out, planned, backend = job.out, job.planned, job.backend
    summary = dict(output=out, rows=job.plan.rows, rows_embedded=0, tokens=0, truncated=0, shards_written=0)
    todo = [] if job.already else [k for k in range(len(planned.shards)) if not shard_done(out, planned, k)]
    context = ray.data.DataContext.get_current()
    retried = context.actor_task_retry_on_errors
    try:
        context.actor_task_retry_on_errors = [RuntimeError, OSError]  # not BidirError: bad input stays bad
        _embed_shards(ray, cfg, job, todo, gpus, n_gpus, load, summary)
    finally:
        context.actor_task_retry_on_errors = retried
    warn_truncated(summary["truncated"], backend)
    complete = job.already or finish(out, planned, job.plan)
    return EmbedSummary(**summary, seconds=time.perf_counter() - start, complete=complete)


def _embed_shards(
    ray, cfg: BatchEmbedConfig, job, todo: list[int], gpus: bool, n_gpus: int, load, summary
) -> None:
    """Stage 1 and 2 over the shards in `todo`; summary's counts added up from what the actors report."""
    out, planned, backend = job.out, job.planned, job.backend
    if todo:
        batching = batching_config(cfg, backend)
        actors = n_gpus if gpus else max(1, int(ray.cluster_resources()["CPU"]) // 2)
        ds = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            _tokenize_shards,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs=dict(
                plan=job.plan,
                cfg=cfg,
                tokenizer=backend.tokenizer,
                prefix=planned.prefix,
                max_length=batching.max_length,
            ),
            num_cpus=1,
        )
        ds = ds.map_batches(
            _EmbedShards,
            batch_size=1,
            batch_format="pyarrow",
            fn_constructor_kwargs=dict(
                cfg=cfg, out=str(out), batching=batching, load=load, job=planned.input_fingerprint
            ),
            compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(todo)))),
            num_gpus=1 if gpus else 0,
            num_cpus=1,
            # the actors' own Ray options (Ray Data passes them on)
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if (error := row.pop("error")) is not None:
                    raise BidirError(error)  # the first bad shard met; the dataset stops
                for key, value in row.items():
                    summary[key] += value


def _wants_gpu(ray, cfg: BatchEmbedConfig) -> bool:
    if cfg.device is not None:
        return cfg.device.startswith("cuda")
    return ray.cluster_resources().get("GPU", 0) > 0


def _tokenize_shards(
    batch, *, plan: InputPlan, cfg: BatchEmbedConfig, tokenizer, prefix: str, max_length: int
):
    """Stage 1 (a CPU task): each shard's rows read, validated and tokenized; one output row per shard. A bad row is
    passed on as the shard's `error` (Ray keeps only the text of a raised exception, and would retry it)."""
    import pyarrow as pa

    out = []
    for k in batch.column("shard").to_pylist():
        try:
            rows = list(shard_rows(plan, k, cfg.id_field, cfg.text_field))
            token_ids, cut = tokenize_rows(rows, tokenizer, prefix, max_length)
        except BidirError as e:
            out.append(
                {"shard": k, "ids": [], "wheres": [], "token_ids": [], "truncated": 0, "error": str(e)}
            )
            continue
        ids, wheres = [r.id for r in rows], [r.where for r in rows]
        out.append(
            {
                "shard": k,
                "ids": ids,
                "wheres": wheres,
                "token_ids": token_ids,
                "truncated": cut,
                "error": None,
            }
        )
    return pa.Table.from_pylist(out, schema=_schemas()[0])


class _EmbedShards:
    """Stage 2 (an actor): one backend, loaded once; each call embeds and writes whole shards."""

    def __init__(self, cfg: BatchEmbedConfig, out: str, batching: BatchingConfig, load: Callable, job: str):
        self.cfg, self.out, self.batching, self.job = cfg, Path(out), batching, job
        self.backend = load_job_backend(cfg, load)

    def __call__(self, batch):
        import pyarrow as pa

        stats = []
        for shard in batch.to_pylist():
            row = {
                "rows_embedded": 0,
                "tokens": 0,
                "truncated": 0,
                "shards_written": 0,
                "error": shard["error"],
            }
            if row["error"] is None:
                try:
                    row.update(self._write(shard))
                except BidirError as e:  # non-finite embeddings, a full disk: reported, not retried
                    row["error"] = str(e)
            stats.append(row)
        return pa.Table.from_pylist(stats, schema=_schemas()[1])

    def _write(self, shard: dict) -> dict:
        from bidir_core.embeddings_artifact import ShardWriter

        k, ids, wheres, token_ids = shard["shard"], shard["ids"], shard["wheres"], shard["token_ids"]
        size, tokens = self.batching.window, 0
        with ShardWriter(
            self.out, k, self.backend.dim, self.cfg.dtype, self.job
        ) as writer:  # renamed when complete
            for lo in range(0, len(ids), size):
                batches = batch_window(token_ids[lo : lo + size], self.batching, self.backend.prepare)
                window = Window(k, ids[lo : lo + size], wheres[lo : lo + size], batches, 0, False)
                writer.write(window.ids, embed_window(self.backend, window, self.out, self.cfg.model))
                tokens += sum(b.tokens for b in batches)
        return {
            "rows_embedded": len(ids),
            "tokens": tokens,
            "truncated": shard["truncated"],
            "shards_written": 1,
        }


def _schemas():
    import pyarrow as pa

    tokenized = pa.schema(
        [
            ("shard", pa.int64()),
            ("ids", pa.list_(pa.string())),
            ("wheres", pa.list_(pa.string())),
            ("token_ids", pa.list_(pa.list_(pa.int32()))),
            ("truncated", pa.int64()),
            ("error", pa.string()),
        ]
    )
    counts = ["rows_embedded", "tokens", "truncated", "shards_written"]
    return tokenized, pa.schema([*((c, pa.int64()) for c in counts), ("error", pa.string())])
