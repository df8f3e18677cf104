"""read_texts: the raw text of a dataset for MNTP."""

from __future__ import annotations

import json

import pytest

from bidir_core.datasets import read_texts, stdlib_train
from bidir_core.errors import BidirError


def test_txt_lines_distinct_in_order(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("b text\n\na text\nb text\n   \nc text\n")
    assert read_texts(path) == ["b text", "a text", "c text"]


def test_jsonl_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"title": "T1", "body": ["x", "y"], "other": "o"}, {"title": "T2", "body": "x", "other": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_texts(path, ["title", "body"]) == ["T1", "x", "y", "T2"]
    assert read_texts(path, ["title"]) == ["T1", "T2"]
    with pytest.raises(BidirError, match=r"t\.jsonl:1: missing field 'nope'"):
        read_texts(path, ["nope"])
    with pytest.raises(BidirError, match=r"t\.jsonl:2: field 'other' must be a string or a list of strings"):
        read_texts(path, ["title", "other"])


def test_training_rows_give_queries_positives_and_negatives(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        {"query": "q1", "pos_doc": "p1", "neg_doc": ["n1", "p1"]},
        {"query": "q1", "pos_doc": ["p2", "p3"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_texts(path) == ["q1", "p1", "n1", "p2", "p3"]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a1\tb1\tc1\n")
    with pytest.raises(BidirError, match="read from a .jsonl file only"):
        read_texts(tsv, ["query"])
    assert read_texts(tsv) == ["a1", "b1", "c1"]


def test_stdlib_passages():
    texts = read_texts("stdlib-docstrings")
    passages = list(dict.fromkeys(p for ex in stdlib_train() for p in ex.positives))
    assert texts == passages and len(texts) > 1000
    with pytest.raises(BidirError, match="has no fields"):
        read_texts("stdlib-docstrings", ["text"])


def test_empty_and_missing(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n \n")
    with pytest.raises(BidirError, match=r"e\.txt: no text"):
        read_texts(empty)
    with pytest.raises(BidirError, match="no such file"):
        read_texts(tmp_path / "missing.txt")
