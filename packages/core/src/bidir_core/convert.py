"""bidir-convert: turn any supported source into a bidir checkpoint (a thin CLI over BiEncoder)."""

from __future__ import annotations

import argparse
import sys

from bidir_core.cli import run_cli
from bidir_core.families import ATTENTION_MODES
from bidir_core.pooling import POOLING_STRATEGIES

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names

EXAMPLES = """examples:
  bidir-convert ./Llama-3.2-1B ./llama-1b-bidir --pooling avg --dtype bfloat16
  bidir-convert ./model.Q4_1.gguf ./bidir-ckpt
  bidir-convert ./Qwen3-Embedding-0.6B ./qwen3-embed --attention causal   # causal, last-token pooling
  bidir-convert smollm2-135m ./smollm2-bidir --pooling weighted_avg"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bidir-convert",
        description="Convert a Hugging Face Llama, Mistral, Ministral, Ministral3, Qwen2 or Qwen3 folder, an NVIDIA "
        "llama_bidirec folder, a .gguf file or the embedded default 'smollm2-135m' into a bidir checkpoint "
        "(loads in bidir, transformers and sentence-transformers).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="source folder, .gguf file or 'smollm2-135m'")
    p.add_argument("out", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument(
        "--pooling", choices=POOLING_STRATEGIES, help="pooling strategy (default: the source's, or avg)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)")
    p.add_argument("--no-normalize", action="store_true", help="store normalize=false")
    p.add_argument("--max-length", type=int, help="max tokens per text (default: the source's, or 512)")
    p.add_argument(
        "--attention",
        choices=ATTENTION_MODES,
        help="attention mode (default: a bidir checkpoint's own, else bidirectional); causal defaults the "
        "pooling to last",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("bidir-convert", lambda: convert(args))


def convert(args: argparse.Namespace) -> None:
    """Load args.src, write the checkpoint at args.out and say what was written."""
    import torch  # imported after parsing, so --help answers at once

    from bidir_core.encoder import BiEncoder

    encoder = BiEncoder.from_pretrained(
        args.src,
        pooling=args.pooling,
        normalize=False if args.no_normalize else None,
        max_length=args.max_length,
        attention=args.attention,
        dtype=getattr(torch, args.dtype),
    )
    out = encoder.save_pretrained(args.out, overwrite=args.overwrite)
    n_params = sum(p.numel() for p in encoder.model.parameters())
    print(
        f"wrote {out} ({n_params / 1e6:.1f}M parameters, {args.dtype}, {encoder.config.attention} attention, "
        f"pooling={encoder.config.pooling})"
    )


if __name__ == "__main__":
    sys.exit(main())
