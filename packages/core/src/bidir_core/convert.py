"""bidir-convert: turn any supported source into a bidir checkpoint (a thin CLI over BiEncoder), or with --reranker
into a reranker checkpoint (over CrossEncoder)."""

from __future__ import annotations

import argparse
import sys

from bidir_core.cli import run_cli
from bidir_core.errors import BidirError
from bidir_core.families import ATTENTION_MODES
from bidir_core.pooling import POOLING_STRATEGIES

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names

EXAMPLES = """examples:
  bidir-convert ./Llama-3.2-1B ./llama-1b-bidir --pooling avg --dtype bfloat16
  bidir-convert ./model.Q4_1.gguf ./bidir-ckpt
  bidir-convert ./Qwen3-Embedding-0.6B ./qwen3-embed --attention causal   # causal, last-token pooling
  bidir-convert smollm2-135m ./smollm2-bidir --pooling weighted_avg
  bidir-convert ./llama-nemotron-rerank-1b-v2 ./nemotron-rerank --reranker        # a reranker folder as it is
  bidir-convert ./Qwen3-Reranker-0.6B ./qwen3-rerank --reranker --yes-token yes --no-token no \\
      --template-file qwen3-reranker-prompt.txt     # {query} and {passage} in the model's chat prompt
"""


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
    rr = p.add_argument_group(
        "reranker (a cross-encoder checkpoint: one relevance logit per query-passage pair)"
    )
    rr.add_argument(
        "--reranker",
        action="store_true",
        help="write a reranker: from a reranker source (a bidir reranker, an NVIDIA "
        "LlamaBidirectionalForSequenceClassification or a *ForSequenceClassification folder) as it is, or from a "
        "causal LM with --yes-token/--no-token",
    )
    rr.add_argument(
        "--yes-token",
        help="with --no-token: score logit(yes) - logit(no) of a causal LM at the last token (a head of "
        "lm_head[yes] - lm_head[no], last pooling, causal attention); each must be one token",
    )
    rr.add_argument("--no-token", help="see --yes-token")
    template = rr.add_mutually_exclusive_group()
    template.add_argument("--template", help="the text a pair becomes, with {query} and {passage} once each")
    template.add_argument(
        "--template-file",
        metavar="FILE",
        help="--template read from a UTF-8 file, exactly (a chat prompt's trailing newlines included, which a "
        "shell's $(cat FILE) would drop)",
    )
    rr.add_argument(
        "--temperature", type=float, help="the logit is divided by it (default: the source's, or 1)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("bidir-convert", lambda: convert(args))


def convert(args: argparse.Namespace) -> None:
    """Load args.src, write the checkpoint at args.out and say what was written."""
    import torch  # imported after parsing, so --help answers at once

    from bidir_core.encoder import BiEncoder

    if args.reranker:
        return convert_reranker(args)
    for flag in ("yes_token", "no_token", "template", "template_file", "temperature"):
        if getattr(args, flag) is not None:
            raise BidirError(f"--{flag.replace('_', '-')} applies to a reranker: add --reranker")

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


def convert_reranker(args: argparse.Namespace) -> None:
    """--reranker: a reranker source as it is, or a causal LM's yes/no token logits as the head."""
    import torch

    from bidir_core.cross_encoder import CrossEncoder

    if args.no_normalize:
        raise BidirError("--no-normalize applies to an embedder; a reranker's score is not normalized")
    if (args.yes_token is None) != (args.no_token is None):
        raise BidirError("--yes-token and --no-token go together")
    if args.template_file is not None:
        args.template = read_template(args.template_file)
    dtype = getattr(torch, args.dtype)
    if args.yes_token is not None:
        if args.temperature is not None:
            raise BidirError("--temperature would change the yes/no logit difference; leave it out")
        ce = CrossEncoder.from_causal_lm(
            args.src,
            args.yes_token,
            args.no_token,
            template=args.template,
            pooling=args.pooling or "last",
            attention=args.attention or "causal",
            max_length=args.max_length,
            dtype=dtype,
        )
    else:
        ce = CrossEncoder.from_pretrained(
            args.src,
            template=args.template,
            pooling=args.pooling,
            temperature=args.temperature,
            max_length=args.max_length,
            attention=args.attention,
            dtype=dtype,
        )
    out = ce.save_pretrained(args.out, overwrite=args.overwrite)
    n_params = sum(p.numel() for p in ce.model.parameters())
    print(
        f"wrote reranker {out} ({n_params / 1e6:.1f}M parameters, {args.dtype}, {ce.config.attention} attention, "
        f"pooling={ce.config.pooling}, temperature={ce.config.temperature:g})"
    )


def read_template(path: str) -> str:
    """A --template-file's text as it is (no newline stripped or translated)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except OSError as e:
        raise BidirError(f"{path}: cannot read the template: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BidirError(f"{path}: the template is not UTF-8 text") from None


if __name__ == "__main__":
    sys.exit(main())
