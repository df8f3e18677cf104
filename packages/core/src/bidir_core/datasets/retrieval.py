"""Retrieval evaluation data: a BEIR-style folder, read whole into memory and validated.
(sources.load_retrieval takes a folder or the built-in dataset's name.)

corpus.jsonl        {"_id": str, "title": str (optional), "text": str}
queries.jsonl       {"_id": str, "text": str}
qrels/<split>.tsv   query-id <TAB> corpus-id <TAB> score (integer, graded), with or without a header line
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from bidir_core.datasets.lines import id_field, read_jsonl, read_lines, text_field
from bidir_core.errors import BidirError


@dataclass(frozen=True)
class RetrievalDataset:
    """A corpus, queries and graded relevance judgments (qrels)."""

    name: str
    """Where it came from (folder path and split, or the embedded dataset's name)."""
    corpus: dict[str, str]
    """Document id -> passage text (BEIR: title and text joined by a space, title first when non-empty)."""
    queries: dict[str, str]
    """Query id -> text: the queries that have judgments in this split."""
    qrels: dict[str, dict[str, int]]
    """Query id -> {document id: graded relevance}; relevance <= 0 means judged non-relevant."""

    def judged_queries(self) -> list[str]:
        """The ids of the judged queries, the ones a run ranks documents for; each must have a text."""
        missing = [q for q in self.qrels if q not in self.queries]
        if missing:
            raise BidirError(f"{self.name}: {len(missing)} judged queries have no text, e.g. {missing[0]!r}")
        return list(self.qrels)


def load_beir(folder: Path, split: str = "test") -> RetrievalDataset:
    """A BEIR folder's corpus, the queries judged in qrels/<split>.tsv and those judgments.

    Queries without judgments in this split are left out (as BEIR does); qrels naming an unknown query or document,
    a duplicate id or a malformed row is a BidirError naming the file and line.
    """
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise BidirError(f"{folder}: no qrels/{split}.tsv (splits found: {', '.join(found) or 'none'})")
    corpus = read_corpus(folder / "corpus.jsonl")
    queries = _read_queries(folder / "queries.jsonl")
    qrels = _read_qrels(qrels_path, corpus, queries)
    return RetrievalDataset(
        name=f"{folder}:{split}",
        corpus=corpus,
        queries={qid: queries[qid] for qid in qrels},
        qrels=qrels,
    )


def read_corpus(path: Path) -> dict[str, str]:
    """A BEIR corpus.jsonl alone: document id -> "title text" (also read by bidir-mine); at least one document."""
    corpus: dict[str, str] = {}
    empty: list[int] = []  # line numbers of documents without any text
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        doc_id = id_field(row, "_id", where)
        title = text_field(row, "title", where, required=False, allow_empty=True).strip()
        text = text_field(row, "text", where, allow_empty=True).strip()
        if doc_id in corpus:
            raise BidirError(f"{where}: duplicate document id {doc_id!r}")
        corpus[doc_id] = f"{title} {text}".strip()
        if not corpus[doc_id]:
            empty.append(number)
    if not corpus:
        raise BidirError(f"{path}: no documents")
    if empty:
        # Real collections have a few (Cranfield: 2); they stay in the corpus, where they can be retrieved.
        lines = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        warnings.warn(
            f"{path}: {len(empty)} documents have no title and no text (lines {lines})", stacklevel=3
        )
    return corpus


def _read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        query_id = id_field(row, "_id", where)
        if query_id in queries:
            raise BidirError(f"{where}: duplicate query id {query_id!r}")
        queries[query_id] = text_field(row, "text", where)
    return queries


def _read_qrels(path: Path, corpus: dict[str, str], queries: dict[str, str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for number, text in read_lines(path):
        where = f"{path}:{number}"
        if not text.strip():
            continue
        cells = text.split("\t")
        if number == 1 and cells[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # BEIR's header line
        if len(cells) != 3:
            raise BidirError(f"{where}: expected query-id<TAB>corpus-id<TAB>score, got {len(cells)} columns")
        query_id, doc_id, score = (c.strip() for c in cells)
        try:
            relevance = int(score)
        except ValueError:
            raise BidirError(f"{where}: score {score!r} is not an integer") from None
        if query_id not in queries:
            raise BidirError(f"{where}: unknown query id {query_id!r} (not in queries.jsonl)")
        if doc_id not in corpus:
            raise BidirError(f"{where}: unknown document id {doc_id!r} (not in corpus.jsonl)")
        judged = qrels.setdefault(query_id, {})
        if doc_id in judged:
            raise BidirError(f"{where}: duplicate judgment for query {query_id!r} and document {doc_id!r}")
        judged[doc_id] = relevance
    if not qrels:
        raise BidirError(f"{path}: no judgments")
    return qrels
