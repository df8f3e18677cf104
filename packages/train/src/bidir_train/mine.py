"""bidir-mine: hard negatives for training rows, mined with an embedding model and filtered by a positive-aware margin.

Why: the passages a model ranks just below a query's positive are the most useful negatives, but in pair data many of
them are unlabeled positives (the same fact in other words). Training against those teaches the model to push true
answers away. So a candidate is kept only if it scores clearly below the row's own positive: NV-Retriever's
TopK-PercPos rule (arXiv 2407.15831) drops every candidate with score > margin x positive score (default 0.95),
where the positive score is the cosine of the query and its least similar positive. Candidates that are a positive
(same document id or same text), the query itself or a duplicate are dropped too; the best survivors become neg_doc.

With skip_top = N, the N best candidates that are not a positive are left out before the margin applies (the paper's
"top-k shifted by N"). Why: on a corpus where a query has several relevant passages (a topic's abstracts, a product's
reviews), the unlabeled positives sit at the top ranks whatever their score relative to the labeled one, so a margin
on the score does not catch them; skipping ranks does.

The corpus is a BEIR corpus.jsonl (or its folder), a .txt file (one passage per line), or by default every distinct
positive and negative of the training rows. The output is the training rows, in order, as NeMo-style JSONL.

With `rescore` (a reranker), every written row also gets teacher scores: the reranker's logit of the query with
each positive (pos_score) and each negative (neg_scores), what the distillation losses learn from
(bidir_train.rerank_loss). The negatives are the ones mined above, filtered the same way. Without it, a row whose
negatives were added to loses the scores it came with (its new negatives have none).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bidir_core.cli import run_cli
from bidir_core.datasets import TrainingExample, read_training_examples
from bidir_core.datasets.lines import read_lines
from bidir_core.datasets.retrieval import read_corpus
from bidir_core.devices import PRECISIONS, check_precision, default_device, precision_dtype
from bidir_core.errors import BidirError
from bidir_core.jsonfile import write_jsonl_atomic
from bidir_core.outputs import check_new_output
from bidir_core.search import exact_search

Corpus = Sequence[tuple[str | None, str]]  # (document id or None, passage text) per passage
_QUERY_BLOCK = 4096  # queries searched at once (one progress step)


@dataclass(frozen=True)
class MineConfig:
    """One mining job."""

    model: str
    """Anything BiEncoder.from_pretrained accepts: a checkpoint folder, a .gguf file, 'smollm2-135m'."""
    train: str
    """Training rows: a .jsonl / .tsv file or 'stdlib-docstrings'."""
    output: str
    """The JSONL file to write (to a temporary file beside it, then renamed)."""
    corpus: str | None = None
    """BEIR corpus.jsonl or its folder, or a .txt file (one passage per line); None: the rows' own passages."""
    top_k: int = 30
    """Candidates retrieved per query before filtering."""
    num_negatives: int = 4
    """Negatives per row in the output (NeMo's Llama recipes train on 4 hard negatives)."""
    margin: float = 0.95
    """Drop candidates scoring above margin x positive score; 1.0 drops only those above the positive."""
    skip_top: int = 0
    """Leave out the skip_top best candidates that are not a positive (0: none)."""
    batch_size: int = 32
    """Texts per forward pass."""
    max_length: int | None = None
    """Tokens per text (None: the model's max_length)."""
    keep_existing: bool = True
    """Keep a row's own neg_doc first; mined negatives fill up to num_negatives after them."""
    device: str | None = None
    """cpu or cuda (None: cuda when available)."""
    precision: str = "fp32"
    """The weights of the embedder (and of the rescore reranker): fp32, bf16, or auto (bf16 where the device computes
    it in hardware; bidir_core.devices)."""
    overwrite: bool = False
    """Replace an existing output file instead of refusing."""
    progress: bool = True
    """Show progress bars."""
    drop_empty_rows: bool = False
    """Leave out (and count) the rows that end with no negative, which a trainer with data.num_negatives >= 1
    refuses; False keeps every row."""
    rescore: str | None = None
    """A reranker (anything CrossEncoder.from_pretrained loads with its head) that scores every written row's
    positives and negatives into pos_score / neg_scores; None: no teacher scores."""

    def __post_init__(self):
        for name in ("top_k", "num_negatives", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BidirError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.skip_top, bool) or not isinstance(self.skip_top, int) or self.skip_top < 0:
            raise BidirError(f"skip_top must be a non-negative integer, got {self.skip_top!r}")
        if self.top_k < self.skip_top + self.num_negatives:
            raise BidirError(
                f"top_k ({self.top_k}) must be at least skip_top + num_negatives "
                f"({self.skip_top} + {self.num_negatives})"
            )
        if not 0 < self.margin <= 1:
            raise BidirError(f"margin must be in (0, 1], got {self.margin!r}")
        check_precision(self.precision)


def _norm(text: str) -> str:
    return " ".join(text.split())


def load_corpus(source: str | Path) -> list[tuple[str | None, str]]:
    """(id, text) per passage of a BEIR corpus.jsonl / folder (ids: _id) or a .txt file (no ids: a line number is
    no document id the training rows could share). Passages without text are left out."""
    path = Path(source)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if path.suffix.lower() in (".jsonl", ".json"):
        passages = list(read_corpus(path).items())
    elif path.suffix.lower() == ".txt":
        passages = [(None, text) for _, text in read_lines(path)]
    else:
        raise BidirError(
            f"{path}: unknown corpus format: expected a BEIR folder, a corpus .jsonl or a .txt file"
        )
    passages = [(doc_id, text) for doc_id, text in passages if text.strip()]
    if not passages:
        raise BidirError(f"{path}: the corpus has no passages")
    return passages


def pool_corpus(examples: Sequence[TrainingExample]) -> list[tuple[str | None, str]]:
    """Every distinct (by normalised text) positive and negative of the rows, with the first id given for it."""
    pool: dict[str, tuple[str | None, str]] = {}
    for ex in examples:
        for texts, ids in ((ex.positives, ex.positive_ids), (ex.negatives, ex.negative_ids)):
            for j, text in enumerate(texts):
                pool.setdefault(_norm(text), (ids[j] if ids else None, text))
    return list(pool.values())


def mine_negatives(
    encoder,
    examples: Sequence[TrainingExample],
    corpus: Corpus,
    *,
    top_k: int = 30,
    num_negatives: int = 4,
    margin: float = 0.95,
    skip_top: int = 0,
    batch_size: int = 32,
    keep_existing: bool = True,
    progress: bool = False,
    device: str | None = None,
) -> tuple[list[TrainingExample], Counter]:
    """The rows with mined negatives (see the module docstring), and counts: dropped_positive, skipped_top,
    dropped_margin, short_rows (fewer than num_negatives negatives), empty_rows (needed negatives, none mined),
    negatives.

    encoder: anything with encode_queries / encode_documents(texts, batch_size=, normalize=, show_progress_bar=).
    """
    device = device or default_device()
    kw = dict(batch_size=batch_size, normalize=True, show_progress_bar=progress)  # normalized: dot = cosine
    texts = [text for _, text in corpus]
    where = {text: i for i, text in enumerate(texts)}  # text -> row of docs
    extra = list(dict.fromkeys(p for ex in examples for p in ex.positives if p not in where))
    where.update({text: len(texts) + i for i, text in enumerate(extra)})
    # The corpus, then the positives that are not in it (their embeddings give the positive scores).
    docs = encoder.encode_documents(texts + extra, **kw)  # (N + E, D)
    check_finite_embeddings(docs, "passage", (texts + extra))
    queries = encoder.encode_queries([ex.query for ex in examples], **kw)  # (Q, D)
    check_finite_embeddings(queries, "query", [ex.query for ex in examples])
    docs, queries = torch.from_numpy(docs).to(device), torch.from_numpy(queries).to(device)

    scores, indices = [], []  # per query block: (q, k) fp32 cosine, (q, k) int64 corpus index, best first
    blocks = range(0, len(examples), _QUERY_BLOCK)
    for start in tqdm(blocks, disable=not progress, desc="search", unit="block"):
        s, i = exact_search(queries[start : start + _QUERY_BLOCK], docs[: len(texts)], top_k)
        scores += s.tolist()
        indices += i.tolist()

    # Rows that share a query (an SNLI premise with several entailments) share their positives: one row's positive
    # is never another's negative.
    positives_of: dict[str, set[str]] = {}
    for ex in examples:
        positives_of.setdefault(_norm(ex.query), set()).update(map(_norm, ex.positives))

    counts: Counter = Counter()
    rows = []
    for q, ex in enumerate(examples):
        positives = torch.stack([docs[where[p]] for p in ex.positives])  # (P, D)
        # TopK-PercPos: margin x the score of the least similar positive.
        threshold = margin * float((positives @ queries[q]).min())
        negatives = list(ex.negatives) if keep_existing else []
        neg_ids = list(ex.negative_ids or [None] * len(ex.negatives)) if keep_existing else []
        pos_texts = positives_of[_norm(ex.query)]
        seen = {*pos_texts, _norm(ex.query), *map(_norm, negatives)}  # the query and duplicates are dropped
        seen_ids = {*ex.positive_ids, *neg_ids} - {None}
        mined = ranked = 0  # ranked: candidates so far that are not a positive
        for score, c in zip(scores[q], indices[q], strict=True):
            doc_id, text = corpus[c]
            if _norm(text) in pos_texts or doc_id in ex.positive_ids:
                counts["dropped_positive"] += 1
                continue
            ranked += 1
            if ranked <= skip_top:
                counts["skipped_top"] += 1
            elif score > threshold:
                counts["dropped_margin"] += 1
            elif len(negatives) < num_negatives and _norm(text) not in seen and doc_id not in seen_ids:
                negatives.append(text)
                neg_ids.append(doc_id)
                seen.add(_norm(text))
                seen_ids |= {doc_id} - {None}
                mined += 1
        counts["negatives"] += len(negatives)
        counts["short_rows"] += len(negatives) < num_negatives
        counts["empty_rows"] += mined == 0 and len(negatives) < num_negatives
        # Ids only for rows keyed by id, and only when every negative has one: the loss compares passages by id
        # when a row has ids and by text otherwise, so a half-keyed row would hide a repeated document from it.
        keyed = bool(ex.positive_ids or ex.negative_ids) and None not in neg_ids
        # The row's own teacher scores stay only while its negatives are the ones they score.
        changed = tuple(negatives) != ex.negatives
        scored = {"positive_scores": (), "negative_scores": ()} if changed else {}
        rows.append(
            dataclasses.replace(
                ex, negatives=tuple(negatives), negative_ids=tuple(neg_ids) if keyed else (), **scored
            )
        )
    return rows, counts


def rescore_rows(reranker, rows: Sequence[TrainingExample], *, batch_size: int = 32, progress: bool = False):
    """rows with teacher scores: the reranker's logits (CrossEncoder.predict) of the query with each positive and
    each negative. A score that is not finite stops the job (predict names the pair); nothing is written."""
    pairs = [(ex.query, doc) for ex in rows for doc in (*ex.positives, *ex.negatives)]
    scores = reranker.predict(pairs, batch_size=batch_size, show_progress_bar=progress).tolist()
    out, start = [], 0
    for ex in rows:
        p, n = len(ex.positives), len(ex.negatives)
        out.append(
            dataclasses.replace(
                ex,
                positive_scores=tuple(scores[start : start + p]),
                negative_scores=tuple(scores[start + p : start + p + n]),
            )
        )
        start += p + n
    return out


def check_finite_embeddings(embeddings, what: str, texts: Sequence[str]) -> None:
    """nan/inf embeddings (a NaN model, fp16 overflow) would rank candidates arbitrarily: stop, naming the first."""
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise BidirError(
            f"the model produced non-finite (nan/inf) embeddings for {int(bad.sum())} of {len(texts)} {what} texts, "
            f"the first {what} {first + 1} ({texts[first][:60]!r}); nothing was written"
        )


def mine(cfg: MineConfig, encoder=None) -> dict:
    """Mine negatives for every row of cfg.train into cfg.output; return a summary dict. encoder: an already loaded
    one (cfg.model, cfg.max_length, and cfg.device and cfg.precision for the embedder, are then not used)."""
    start = time.perf_counter()
    output = Path(cfg.output).expanduser()  # the file checked is the file written
    check_new_output(output, overwrite=cfg.overwrite)  # before the embedding, not after it
    examples = list(read_training_examples(cfg.train))
    if not examples:
        raise BidirError(f"{cfg.train}: no training rows")
    corpus = load_corpus(cfg.corpus) if cfg.corpus is not None else pool_corpus(examples)
    device = cfg.device or default_device()
    dtype = precision_dtype(cfg.precision, device)
    if encoder is None:
        from bidir_core.encoder import BiEncoder  # imported late: transformers takes a while

        encoder = BiEncoder.from_pretrained(cfg.model, max_length=cfg.max_length, device=device, dtype=dtype)
        encoder = encoder.eval()
    reranker = None
    if cfg.rescore is not None:  # loaded before the embedding: a bad reranker costs nothing
        from bidir_core.cross_encoder import CrossEncoder

        reranker = CrossEncoder.from_pretrained(cfg.rescore, device=device, dtype=dtype).eval()
    rows, counts = mine_negatives(
        encoder,
        examples,
        corpus,
        top_k=cfg.top_k,
        num_negatives=cfg.num_negatives,
        margin=cfg.margin,
        skip_top=cfg.skip_top,
        batch_size=cfg.batch_size,
        keep_existing=cfg.keep_existing,
        progress=cfg.progress,
        device=device,
    )
    dropped = 0
    if cfg.drop_empty_rows:
        kept = [ex for ex in rows if ex.negatives]
        rows, dropped = kept, len(rows) - len(kept)
        if not rows:
            raise BidirError(
                f"{cfg.train}: no row got a negative, so --drop-empty-rows leaves nothing to write"
            )
    if reranker is not None:  # after the drop: a left-out row costs no reranker forward
        rows = rescore_rows(reranker, rows, batch_size=cfg.batch_size, progress=cfg.progress)
    write_jsonl_atomic(output, map(training_row, rows))  # a complete-looking file is a complete one
    # The dropped rows were short ones that also got no mined negative: count only the rows written.
    short, empty = counts["short_rows"] - dropped, counts["empty_rows"] - dropped
    if short:
        warnings.warn(
            f"{short} of {len(rows)} rows have fewer than {cfg.num_negatives} negatives ({empty} got no mined "
            "negative): raise top_k, or the margin, or give a larger corpus"
            + (", or lower skip_top" if cfg.skip_top else ""),
            stacklevel=2,
        )
    return {
        "output": str(output),
        "rows": len(rows),
        "corpus": len(corpus),
        "negatives_per_row": counts["negatives"] / len(rows),
        "dropped_positive": counts["dropped_positive"],
        "skipped_top": counts["skipped_top"],
        "dropped_margin": counts["dropped_margin"],
        "short_rows": short,  # of the rows written
        "dropped_rows": dropped,
        "seconds": time.perf_counter() - start,
    }


def training_row(ex: TrainingExample) -> dict:
    """A NeMo-style JSONL row, which bidir_core.datasets.read_training_examples reads back."""
    row = {"query": ex.query, "pos_doc": list(ex.positives), "neg_doc": list(ex.negatives)}
    if ex.positive_ids:
        row["pos_ids"] = list(ex.positive_ids)
    if ex.negative_ids:
        row["neg_ids"] = list(ex.negative_ids)
    if ex.positive_scores:
        row["pos_score"] = list(ex.positive_scores)
        row["neg_scores"] = list(ex.negative_scores)
    return row


EXAMPLES = """examples:
  bidir-mine smollm2-135m --train pairs.jsonl --output mined.jsonl
  bidir-mine ./my-embedder --train train.tsv --corpus ./beir-folder --output mined.jsonl --num-negatives 7
  bidir-mine ./my-embedder --train train.jsonl --corpus passages.txt --output mined.jsonl --margin 0.9 --overwrite
  bidir-mine ./my-embedder --train questions.jsonl --output mined.jsonl --skip-top 10   (many relevant passages a query)
  bidir-mine ./my-embedder --train train.jsonl --output scored.jsonl --rescore runs/reranker/final"""


def parse_args(argv: list[str] | None = None) -> MineConfig:
    d = MineConfig("", "", "")
    p = argparse.ArgumentParser(
        prog="bidir-mine",
        description="Mine hard negatives for training rows with an embedding model, dropping candidates that "
        "score above MARGIN x the positive's score (likely unlabeled positives). Writes NeMo-style JSONL.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", help="a bidir checkpoint, a Hugging Face Llama folder, a .gguf file or 'smollm2-135m'"
    )
    p.add_argument("--train", required=True, help="training rows: .jsonl, .tsv or 'stdlib-docstrings'")
    p.add_argument("--output", required=True, help="the JSONL file to write")
    p.add_argument("--corpus", help="BEIR folder / corpus.jsonl or .txt (default: the rows' own passages)")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"candidates per query (default {d.top_k})")
    p.add_argument(
        "--num-negatives", type=int, default=d.num_negatives, help=f"per row (default {d.num_negatives})"
    )
    p.add_argument("--margin", type=float, default=d.margin, help=f"in (0, 1] (default {d.margin})")
    p.add_argument(
        "--skip-top",
        type=int,
        default=d.skip_top,
        help=f"leave out the N best candidates that are not a positive (default {d.skip_top})",
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"texts per forward (default {d.batch_size})"
    )
    p.add_argument("--max-length", type=int, help="tokens per text (default: the model's)")
    p.add_argument(
        "--keep-existing",
        action=argparse.BooleanOptionalAction,
        default=d.keep_existing,
        help="keep the rows' own neg_doc first (default: yes)",
    )
    p.add_argument(
        "--drop-empty-rows",
        action="store_true",
        help="leave out the rows that got no negative (training with data.num_negatives >= 1 refuses them)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="the models' weights: fp32 (default), bf16, or auto (bf16 where the device computes it in hardware)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--rescore",
        metavar="RERANKER",
        help="a reranker checkpoint: write its scores of each row's positives and negatives (pos_score / "
        "neg_scores), the teacher scores of distillation",
    )
    a = p.parse_args(argv)
    fields = {k: v for k, v in vars(a).items() if k != "no_progress"}
    return MineConfig(**fields, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    return run_cli("bidir-mine", lambda: _report(mine(parse_args(argv))))


def _report(s: dict) -> None:
    print(
        f"bidir-mine: {s['rows']} rows -> {s['output']}: {s['negatives_per_row']:.2f} negatives per row, "
        f"{s['dropped_positive']} candidates dropped as positives, {s['skipped_top']} skipped as the top ranks, "
        f"{s['dropped_margin']} by the margin, "
        f"{s['short_rows']} short rows, {s['dropped_rows']} rows without a negative left out, {s['seconds']:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
