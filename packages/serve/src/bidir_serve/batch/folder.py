"""The output folder of a batch-embed job: what it will hold (the planned manifest and its fingerprint), whether an
earlier run left it resumable, which shards are done, and marking it complete.

Shard k holds input rows [k * shard_size, (k + 1) * shard_size) (plan.py) and appears only when
complete (temp name + rename), so after a kill a rerun skips the shards that exist intact (readable, with their
planned row count and their own index and job in their footer; a complete job's shards are checked too) and computes
the others: every id ends up exactly once. The manifest carries a fingerprint of the inputs (paths, sizes,
modification and change times; for JSONL and text a digest of their bytes: plan.py), the settings and the model; a rerun whose fingerprint differs refuses to mix
its rows with the old ones unless --overwrite is given (an unfinished folder with no shard yet holds nothing to mix,
and is taken over). Nothing in a folder that is not an embeddings folder is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from bidir_core.embeddings_artifact import (
    MANIFEST,
    EmbeddingsManifest,
    Shard,
    check_shard_tag,
    is_shard_name,
    is_shard_temp_name,
    read_embeddings_manifest,
    shard_name,
    write_embeddings_manifest,
)
from bidir_core.errors import BidirError
from bidir_serve.backends import Backend
from bidir_serve.batch.config import BatchEmbedConfig
from bidir_serve.batch.plan import InputPlan
from bidir_serve.prompts import prompt_prefix


def plan_job(cfg: BatchEmbedConfig, backend: Backend, plan: InputPlan) -> EmbeddingsManifest:
    """The manifest the finished job will have (marked incomplete until every shard is written)."""
    prefix = prompt_prefix(backend.config, cfg.prompt)
    inputs_fp, described = plan.fingerprint()  # the files as planned, not as they are now
    n_rows = plan.rows
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
    return EmbeddingsManifest(
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


def _job_fingerprint(inputs_fp: str, settings: dict) -> str:
    blob = json.dumps({"inputs": inputs_fp, "settings": settings}, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _our_shards(folder: Path) -> list[Path]:
    """Shards under their exact names only: a user's part-report.parquet beside them is not ours to judge or
    delete."""
    return [p for p in folder.iterdir() if is_shard_name(p.name)]


def _our_temp_files(folder: Path) -> list[Path]:
    """Temp files a killed run left: a shard's, or the manifest's (bidir_core.jsonfile's .manifest.json.*.tmp)."""
    manifest_tmp = f".{MANIFEST}."
    return [
        p
        for p in folder.iterdir()
        if is_shard_temp_name(p.name) or (p.name.startswith(manifest_tmp) and p.name.endswith(".tmp"))
    ]


def _our_files(folder: Path) -> list[Path]:
    return [*_our_shards(folder), *_our_temp_files(folder), folder / MANIFEST]


def prepare_output(out: Path, planned: EmbeddingsManifest, overwrite: bool) -> bool:
    """Check or create the output folder; write the planned (incomplete) manifest. True if already complete."""
    if out.exists() and not out.is_dir():
        raise BidirError(f"{out}: exists and is not a folder")
    if (out / MANIFEST).is_file():
        old = read_embeddings_manifest(out)
        same = (old.input_fingerprint, old.model_fingerprint) == (
            planned.input_fingerprint,
            planned.model_fingerprint,
        )
        # An unfinished job that published no shard yet (e.g. stopped by a bad row that was fixed since) holds
        # nothing to lose: a new plan takes it over.
        fresh = not old.complete and not _our_shards(out)
        if overwrite or (fresh and not same):
            for path in _our_files(out):
                path.unlink(missing_ok=True)
        elif not same:
            what = "model" if old.model_fingerprint != planned.model_fingerprint else "inputs or settings"
            raise BidirError(
                f"{out}: holds embeddings of other {what} (fingerprint differs); "
                "pass --overwrite to replace them, or choose another output folder"
            )
        # A rerun checks the shards it claims: one deleted or damaged since is computed again.
        elif old.complete and all(shard_done(out, planned, k) for k in range(len(planned.shards))):
            return True
    elif out.is_dir() and any(out.iterdir()):
        raise BidirError(
            f"{out}: not empty and not an embeddings folder (no {MANIFEST}); choose another folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_embeddings_manifest(out, planned)
    return False


def shard_done(out: Path, planned: EmbeddingsManifest, k: int) -> bool:
    """Whether shard k exists, its Parquet footer reads, holds the planned row count and is tagged as shard k of
    this job (a shard copied over another of the same row count is not); anything else is computed again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = planned.shards[k]
    path = out / shard.name
    try:
        if not path.is_file():
            return False
        meta = pq.read_metadata(path)
        check_shard_tag(path, meta, k, planned.input_fingerprint, required=True)
    except (OSError, pa.ArrowException, BidirError):  # not Parquet (e.g. damaged by hand), or not this shard
        return False
    return meta.num_rows == shard.rows


def finish(out: Path, planned: EmbeddingsManifest, plan: InputPlan) -> bool:
    """Mark the manifest complete if every shard exists and the inputs are still as planned (whichever rank finds
    that after writing its own does it; two doing it write the same file). True if complete."""
    if not all(shard_done(out, planned, k) for k in range(len(planned.shards))):
        return False
    plan.check_unchanged()  # the manifest describes the inputs: not once they have changed since
    write_embeddings_manifest(out, dataclasses.replace(planned, complete=True))
    # a shard's temp file left by a killed run (every shard is now complete); not the manifest's, which another
    # rank finishing at the same moment may be writing
    for tmp in out.iterdir():
        if is_shard_temp_name(tmp.name):
            tmp.unlink(missing_ok=True)
    return True
