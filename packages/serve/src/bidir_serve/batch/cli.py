"""batch-embed: embed a corpus (JSONL, Parquet or plain text) into the embeddings artifact, resumably.

The command line over embed_corpus (engine.py): `batch-embed ...` or `python -m bidir_serve.batch_embed ...`;
under `torchrun --nproc-per-node N -m bidir_serve.batch_embed ...` the shards are split by global rank (job.py);
with `--engine ray` a Ray cluster runs them (ray_engine.py).
"""

from __future__ import annotations

import argparse

from bidir_core.cli import run_cli
from bidir_core.embeddings_artifact import EMBEDDING_DTYPES
from bidir_serve.backend_args import add_backend_arguments
from bidir_serve.batch.config import ENGINES, PROMPTS, BatchEmbedConfig
from bidir_serve.batch.engine import embed_corpus

EXAMPLES = """examples:
  batch-embed --model smollm2-135m --input corpus.jsonl --output corpus-emb/
  batch-embed --model ./ckpt --input 'docs/*.parquet' --id-field doc_id --text-field body --output emb/ --dtype float16
  batch-embed --model ./onnx-export --input lines.txt --output emb/ --prompt query --dim 256
  torchrun --nproc-per-node 8 -m bidir_serve.batch_embed --model ./engine --input 'shards/*.jsonl' --output emb/
  batch-embed --engine ray --ray-address auto --model ./ckpt --input 'docs/*.parquet' --output /shared/emb/"""


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
    add_backend_arguments(p, d.backend)
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, help="padded tokens per batch")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="rows per batch")
    p.add_argument("--window", type=int, default=d.window, help="rows sorted by length together")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=d.engine,
        help="local: this process (or torchrun ranks); ray: a Ray cluster (pip install 'bidir-serve[ray]')",
    )
    p.add_argument(
        "--ray-address", help="--engine ray: the cluster to join (default: a local one, or RAY_ADDRESS)"
    )
    p.add_argument(
        "--check-unique-ids",
        action="store_true",
        help="read the whole input before any work: validate every row, check ids unique across shards",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace embeddings of other inputs/settings in --output"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    fields = {k: v for k, v in vars(a).items() if k != "no_progress"}
    return BatchEmbedConfig(**fields, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    return run_cli("batch-embed", lambda: print(embed_corpus(parse_args(argv)).line()))
