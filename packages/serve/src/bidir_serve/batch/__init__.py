"""batch-embed: a corpus (JSONL, Parquet or plain text) into the embeddings artifact, resumably.

config.py      BatchEmbedConfig (every setting, checked)
engine.py      embed_corpus: the job, run here (this process, or each torchrun rank) or by the Ray engine
job.py         what every engine starts from (input planned, model loaded, folder prepared: on rank 0 of a
               torchrun job) and its summary
ray_engine.py  the Ray engine: the same job on a Ray cluster
inputs.py      the input formats, one section each: count, shard starts and reader together (FORMATS)
plan.py        the input plan: files, rows, where each shard starts; reading one shard's slice
unique_ids.py  --check-unique-ids: ids unique across the whole input, in bounded memory
windows.py     rows -> windows of padded token batches on a background thread; a window's embeddings
folder.py      the output folder: planned manifest and fingerprint, resume checks, marking it complete
cli.py         the batch-embed command line
"""

from __future__ import annotations

from bidir_serve.batch.config import BatchEmbedConfig
from bidir_serve.batch.engine import embed_corpus
from bidir_serve.batch.job import EmbedSummary

__all__ = ["BatchEmbedConfig", "EmbedSummary", "embed_corpus"]
