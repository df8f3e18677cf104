"""How many mined negatives are false ones, on Cranfield: a lower bound from its judgments.

A synthetic question asks about one abstract (its positive). When another abstract is judged relevant to one of
Cranfield's own 225 queries together with that positive, the two share a topic, and as a negative it is most likely an
unjudged positive of the question. Only 225 queries are judged, so the share is a lower bound; it is counted over the
rows whose positive is judged relevant to some query (the others cannot show one).

    python benchmarks/false_negatives.py runs/domain/mined.jsonl runs/domain/mined_skip10.jsonl
    python benchmarks/false_negatives.py --ranks runs/domain/synth-256/final runs/domain/mix.jsonl

The first form counts each file's negatives; the second ranks each row's candidates as bidir-mine does (the rows' own
passages, the model's settings, --max-length tokens) and gives the share by rank and by score / positive score, the
two things a miner can filter on. Rows whose positive is not a Cranfield abstract (the stdlib pairs) are left out.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from harness import data_dir

from bidir_core.datasets import load_retrieval, read_training_examples

RANKS = ((1, 5), (6, 10), (11, 20), (21, 30), (31, 60))
# Buckets of score / positive score, best first: a candidate falls in the first whose bound it is above.
RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, float("-inf"))


class Topics:
    """Cranfield's passages by text, and which of its queries judge each document relevant."""

    def __init__(self):
        data = load_retrieval(data_dir() / "cranfield")
        self.doc_of = {text: doc for doc, text in data.corpus.items() if text}  # passage text -> document id
        self.queries: dict[str, set[str]] = defaultdict(set)  # document id -> queries judging it relevant
        for query, judged in data.qrels.items():
            for doc, grade in judged.items():
                if grade > 0:
                    self.queries[doc].add(query)

    def judged(self, passage: str) -> bool:
        """Whether the passage is a Cranfield abstract relevant to some query (only those can show a co-relevant)."""
        return bool(self.queries[self.doc_of.get(passage, "")])

    def share(self, pairs) -> str:
        """How many (positive passage, negative passage) pairs are co-relevant, as text."""
        pairs = [(self.doc_of[p], self.doc_of[n]) for p, n in pairs]
        hits = sum(bool(self.queries[p] & self.queries[n]) for p, n in pairs)
        return f"{len(pairs)} negatives, {hits} co-relevant ({100 * hits / max(len(pairs), 1):.1f} %)"


def count_files(topics: Topics, paths) -> None:
    for path in paths:
        pairs = [
            (ex.positives[0], n)
            for ex in read_training_examples(path)
            if topics.judged(ex.positives[0])
            for n in ex.negatives
            if n in topics.doc_of
        ]
        print(f"{path}: {topics.share(pairs)}")


def count_ranks(topics: Topics, model: str, rows_path: str, max_length: int) -> None:
    import torch

    from bidir_core.encoder import BiEncoder
    from bidir_core.search import exact_search
    from bidir_train.mine import pool_corpus

    rows = list(read_training_examples(rows_path))
    texts = [text for _, text in pool_corpus(rows)]  # bidir-mine's default corpus
    index = {text: i for i, text in enumerate(texts)}
    asked = [ex for ex in rows if topics.judged(ex.positives[0])]
    encoder = BiEncoder.from_pretrained(model, max_length=max_length).eval()
    kw = dict(batch_size=32, normalize=True, show_progress_bar=False)
    docs = torch.from_numpy(encoder.encode_documents(texts, **kw))  # (N, D)
    queries = torch.from_numpy(encoder.encode_queries([ex.query for ex in asked], **kw))  # (Q, D)
    top_scores, top = exact_search(queries, docs, RANKS[-1][1] + 1)  # (Q, 61): 60 ranks besides the positive
    by_rank, by_ratio = defaultdict(list), defaultdict(list)
    for q, ex in enumerate(asked):
        pos = index[ex.positives[0]]
        pos_score = float(docs[pos] @ queries[q])
        rank = 0
        for score, c in zip(top_scores[q].tolist(), top[q].tolist(), strict=True):
            if c == pos:
                continue
            rank += 1  # as bidir-mine counts: candidates that are not the positive
            if texts[c] not in topics.doc_of or rank > RANKS[-1][1]:
                continue  # a stdlib passage has no judgments
            pair = (ex.positives[0], texts[c])
            by_rank[next(r for r in RANKS if r[0] <= rank <= r[1])].append(pair)
            if rank <= 30:  # bidir-mine's default top_k
                by_ratio[next(b for b in RATIOS if score / pos_score > b)].append(pair)
    print(f"{model} on {rows_path}: {len(asked)} questions whose abstract is judged relevant to some query")
    for lo, hi in RANKS:
        print(f"  ranks {lo:2d}-{hi:2d}: {topics.share(by_rank[(lo, hi)])}")
    print(f"  top 30, score / positive score above {RATIOS[0]}: {topics.share(by_ratio[RATIOS[0]])}")
    for above, below in zip(RATIOS[1:], RATIOS, strict=False):
        print(f"  top 30, score / positive score in ({above}, {below}]: {topics.share(by_ratio[above])}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="mined training rows (JSONL) whose negatives are counted")
    p.add_argument("--ranks", nargs=2, metavar=("MODEL", "ROWS"), help="rank ROWS' candidates with MODEL")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text with --ranks (default 256)")
    a = p.parse_args(argv)
    topics = Topics()
    if a.files:
        count_files(topics, a.files)
    if a.ranks:
        count_ranks(topics, *a.ranks, a.max_length)


if __name__ == "__main__":
    main()
