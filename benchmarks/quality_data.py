"""Data for the quality benchmarks (read from ../shared/data; never packaged, never committed).

Training rows for the quality recipe, one JSONL file in the training format bidir_core.datasets reads:

- SNLI triplets: anchor -> entailment hypothesis, with the contradiction hypothesis of the same premise as a hard
  negative (the AllNLI / SimCSE recipe).
- MRPC train: sentence1 -> sentence2 for the pairs labelled paraphrase (label 1).
- STS-B train: sentence1 -> sentence2 for the pairs scored >= 4 (of 5): near-paraphrases.

STS-B dev (the evaluation set) is never read here. Also: limit_retrieval, a smaller retrieval set for quick runs.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from bidir_core.datasets import RetrievalDataset, read_sts
from bidir_core.datasets.lines import read_jsonl, read_lines
from bidir_core.errors import BidirError
from bidir_core.jsonfile import write_jsonl_atomic

STS_MIN_SCORE = 4.0


def _tsv_rows(path: Path, columns: tuple[str, ...]):
    """(line number, {column: cell}) of a headed TSV file, checking the header names the columns we read."""
    header = None
    for number, text in read_lines(path):
        cells = text.split("\t")
        if header is None:
            header = cells
            missing = [c for c in columns if c not in header]
            if missing:
                raise BidirError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
            continue
        if not text.strip():
            continue
        if len(cells) != len(header):
            raise BidirError(f"{path}:{number}: {len(cells)} cells, the header has {len(header)}")
        yield number, dict(zip(header, cells, strict=True))


def snli_rows(data: Path) -> list[dict]:
    path = data / "snli_pairs" / "snli_triplets.tsv"
    return [
        {"query": r["anchor"], "pos_doc": r["positive"], "neg_doc": [r["negative"]]}
        for _, r in _tsv_rows(path, ("anchor", "positive", "negative"))
    ]


def mrpc_rows(data: Path) -> list[dict]:
    path = data / "mrpc" / "mrpc_train.tsv"
    rows = []
    for number, r in _tsv_rows(path, ("label", "sentence1", "sentence2")):
        if r["label"] not in ("0", "1"):
            raise BidirError(f"{path}:{number}: label {r['label']!r} is not 0 or 1")
        if r["label"] == "1":
            rows.append({"query": r["sentence1"], "pos_doc": r["sentence2"]})
    return rows


def stsb_rows(data: Path) -> list[dict]:
    pairs = read_sts(data / "stsb" / "sts-train.tsv")
    return [{"query": p.sentence1, "pos_doc": p.sentence2} for p in pairs if p.score >= STS_MIN_SCORE]


def write_training_rows(data: Path, target: Path, limit: int | None = None) -> dict[str, int]:
    """Write every source's rows (the first `limit` of each, for quick runs) to `target` (JSONL); returns the row
    count per source."""
    parts = {"snli": snli_rows(data), "mrpc": mrpc_rows(data), "stsb": stsb_rows(data)}
    parts = {name: rows[:limit] for name, rows in parts.items()}
    write_jsonl_atomic(target, (row for rows in parts.values() for row in rows))
    return {name: len(rows) for name, rows in parts.items()}


def write_rows_with_installed(rows: Path, target: Path, n: int, seed: int = 0) -> int:
    """`rows` plus n installed-docstrings train rows (a seeded sample; their dev modules are never in it) to
    `target`; returns how many were added. The ablation that asks whether code docstrings help these dev sets."""
    import random

    from bidir_core.datasets.installed import installed_train

    extra = installed_train()
    random.Random(seed).shuffle(extra)
    added = [{"query": e.query, "pos_doc": e.positives[0]} for e in extra[:n]]
    kept = (row for _, row in read_jsonl(rows))
    write_jsonl_atomic(target, itertools.chain(kept, added))
    return len(added)


def limit_retrieval(data: RetrievalDataset, n_queries: int | None, n_docs: int | None) -> RetrievalDataset:
    """The first n_queries judged queries; their judged documents plus the first others, up to n_docs."""
    query_ids = list(data.qrels)[:n_queries]
    judged = list(dict.fromkeys(d for q in query_ids for d in data.qrels[q]))
    keep = judged + [d for d in data.corpus if d not in set(judged)]
    keep = keep[: max(n_docs or len(keep), len(judged))]
    return RetrievalDataset(
        name=f"{data.name} ({len(query_ids)} queries, {len(keep)} docs)",
        corpus={d: data.corpus[d] for d in keep},
        queries={q: data.queries[q] for q in query_ids},
        qrels={q: data.qrels[q] for q in query_ids},
    )
