"""Command line: `python -m bidir_train --config RECIPE [section.key=value ...]`, under torchrun or alone."""

from __future__ import annotations

import argparse
import os
import sys

from bidir_core.errors import BidirError, one_line

EPILOG = """examples:
  torchrun --nproc-per-node 1 -m bidir_train --config default
  torchrun --nproc-per-node 8 -m bidir_train --config llama3_2_1b model.path=/models/Llama-3.2-1B optim.lr=1e-5
  python -m bidir_train --config packages/train/recipes/tiny.yaml schedule.max_steps=10

RECIPE is a YAML file or the name of a packaged recipe (default, tiny, llama3_2_1b, llama_embed_nemotron_8b).
Outputs go to logging.output_dir (default runs/<recipe>/); a rerun with the same recipe resumes from its latest
checkpoint, checkpoint.resume=false starts it over."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bidir_train",
        description="Contrastive fine-tuning of a bidir embedding model from a YAML recipe (torchrun + FSDP2).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default="default", help="recipe file or packaged recipe name (default: default)"
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a recipe value")
    args = parser.parse_args(argv)
    try:
        from bidir_train.recipe import load_recipe
        from bidir_train.trainer import train

        train(load_recipe(args.config, args.overrides))
    except BidirError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stops with the same error; one says it
            print(f"bidir_train: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
