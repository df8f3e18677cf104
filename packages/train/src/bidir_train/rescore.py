"""bidir-rescore: a reranker's scores for training rows as they are, the teacher scores of distillation.

`bidir-mine --rescore` scores the negatives it mines; this scores the rows of a file already mined (or written by
hand) without changing them: the same queries, positives and negatives in the same order, each row with the
reranker's logit of its query and each positive (pos_score) and each negative (neg_scores). So the distillation
data is exactly the data the teacher's own run trained on, and no embedder runs. Scores a row came with are
replaced.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from bidir_core.cli import run_cli
from bidir_core.datasets import read_training_examples
from bidir_core.devices import PRECISIONS, check_precision, default_device, precision_dtype
from bidir_core.errors import BidirError
from bidir_core.jsonfile import write_jsonl_atomic
from bidir_core.outputs import check_new_output
from bidir_train.mine import rescore_rows, training_row


@dataclass(frozen=True)
class RescoreConfig:
    """One rescoring job."""

    reranker: str
    """A reranker checkpoint (anything CrossEncoder.from_pretrained loads with its head)."""
    train: str
    """Training rows: a .jsonl / .tsv file or 'stdlib-docstrings'."""
    output: str
    """The JSONL file to write (to a temporary file beside it, then renamed)."""
    batch_size: int = 32
    """Pairs per forward pass (CrossEncoder.predict's batch_size)."""
    device: str | None = None
    """cpu or cuda (None: cuda when available)."""
    precision: str = "fp32"
    """The reranker's weights: fp32, bf16, or auto (bf16 where the device computes it in hardware)."""
    overwrite: bool = False
    """Replace an existing output file instead of refusing."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise BidirError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        check_precision(self.precision)


def rescore(cfg: RescoreConfig) -> dict:
    """Score every row of cfg.train with cfg.reranker into cfg.output; return a summary dict."""
    start = time.perf_counter()
    output = Path(cfg.output).expanduser()  # the file checked is the file written
    if output.resolve() == Path(cfg.train).expanduser().resolve():
        raise BidirError(f"{output}: is the input --train; write the scored rows to another file")
    check_new_output(output, overwrite=cfg.overwrite)  # before the reranker runs, not after it
    rows = list(read_training_examples(cfg.train))
    if not rows:
        raise BidirError(f"{cfg.train}: no training rows")
    from bidir_core.cross_encoder import CrossEncoder  # imported late: transformers takes a while

    device = cfg.device or default_device()
    reranker = CrossEncoder.from_pretrained(
        cfg.reranker, device=device, dtype=precision_dtype(cfg.precision, device)
    ).eval()
    scored = rescore_rows(reranker, rows, batch_size=cfg.batch_size, progress=cfg.progress)
    write_jsonl_atomic(output, map(training_row, scored))  # a complete-looking file is a complete one
    bare = sum(not ex.negatives for ex in rows)
    if bare:  # kept as they are: the reranker recipe leaves them out, in its own warning
        warnings.warn(
            f"{bare} of {len(rows)} rows have no negatives: scored, but a group of one teaches no ranking",
            stacklevel=2,
        )
    positives = [s for ex in scored for s in ex.positive_scores]
    negatives = [s for ex in scored for s in ex.negative_scores]
    # How often the teacher agrees with the labels: its best negative below its worst positive.
    agree = sum(
        min(ex.positive_scores) > max(ex.negative_scores) for ex in scored if ex.negatives and ex.positives
    )
    return {
        "output": str(output),
        "rows": len(scored),
        "pairs": len(positives) + len(negatives),
        "positive_first": agree / max(1, len(rows) - bare),
        "seconds": time.perf_counter() - start,
    }


EXAMPLES = """examples:
  bidir-rescore runs/reranker/final --train mined.jsonl --output scored.jsonl
  bidir-rescore runs/reranker/final --train mined.jsonl --output scored.jsonl --device cuda --precision bf16 \
      --batch-size 256"""


def parse_args(argv: list[str] | None = None) -> RescoreConfig:
    d = RescoreConfig("", "", "")
    p = argparse.ArgumentParser(
        prog="bidir-rescore",
        description="Score training rows with a reranker (pos_score / neg_scores: the teacher scores of the "
        "distillation losses), keeping every row's queries, positives and negatives as they are.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("reranker", help="a reranker checkpoint (e.g. runs/reranker/final)")
    p.add_argument("--train", required=True, help="training rows: .jsonl, .tsv or 'stdlib-docstrings'")
    p.add_argument("--output", required=True, help="the JSONL file to write")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"pairs per forward (default {d.batch_size})"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="the reranker's weights: fp32 (default), bf16, or auto (bf16 where the device computes it in hardware)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    fields = {k: v for k, v in vars(a).items() if k != "no_progress"}
    return RescoreConfig(**fields, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    return run_cli("bidir-rescore", lambda: _report(rescore(parse_args(argv))))


def _report(s: dict) -> None:
    print(
        f"bidir-rescore: {s['rows']} rows -> {s['output']}: {s['pairs']} pairs scored, every positive above every "
        f"negative in {100 * s['positive_first']:.0f} % of the rows with negatives, {s['seconds']:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
