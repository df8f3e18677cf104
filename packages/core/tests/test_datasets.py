"""bidir_core.datasets: readers for training rows, BEIR folders and STS pairs (good files, every bad-row message),
the JSONL line reader they share, and the embedded stdlib dataset's determinism and shape."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest

from bidir_core.datasets import (
    StsPair,
    TrainingExample,
    load_retrieval,
    read_sts,
    read_training_examples,
)
from bidir_core.datasets.lines import read_jsonl
from bidir_core.datasets.stdlib import _build, stdlib_counts, stdlib_dev, stdlib_train
from bidir_core.errors import BidirError

LONE = '"bad \\ud83d text"'  # JSON text of a string holding half of an emoji


def _jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_training_jsonl(tmp_path):
    path = _jsonl(
        tmp_path / "train.jsonl",
        [
            {"query": "q1", "pos_doc": "p1"},
            {
                "question": "q2",
                "pos_doc": ["p2", "p3"],
                "neg_doc": ["n1"],
                "pos_ids": ["a", 7],
                "neg_id": "b",
            },
            "",  # a blank line is not a row
            {"query": "q3", "pos_doc": ["p4"], "neg_doc": "n2"},
        ],
    )
    rows = list(read_training_examples(path))
    assert rows == [
        TrainingExample("q1", ("p1",), origin=f"{path}:1"),
        TrainingExample("q2", ("p2", "p3"), ("n1",), ("a", "7"), ("b",), origin=f"{path}:2"),
        TrainingExample("q3", ("p4",), ("n2",), origin=f"{path}:4"),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"pos_doc": "p"}, "missing field 'query'"),
        ({"query": 3, "pos_doc": "p"}, "field 'query' must be a string, got int"),
        ({"query": " ", "pos_doc": "p"}, "field 'query' is empty"),
        ({"query": "q"}, "missing field 'pos_doc'"),
        ({"query": "q", "pos_doc": ""}, r"pos_doc\[0\] is empty"),
        ({"query": "q", "pos_doc": []}, "field 'pos_doc' is an empty list"),
        ({"query": "q", "pos_doc": ["p", 1]}, r"pos_doc\[1\] must be a string, got int"),
        (
            {"query": "q", "pos_doc": "p", "neg_doc": {"x": 1}},
            "'neg_doc' must be a string or a list of strings",
        ),
        ({"query": "q", "question": "q", "pos_doc": "p"}, "both 'query' and 'question'"),
        (
            {"query": "q", "pos_doc": ["a", "b"], "pos_ids": ["x"]},
            "'pos_ids' has 1 ids for 2 pos_doc documents",
        ),
        ({"query": "q", "pos_doc": "a", "pos_id": "x", "pos_ids": ["x"]}, "both 'pos_id' and 'pos_ids'"),
        (
            {"query": "q", "pos_doc": "a", "neg_doc": ["n"], "neg_ids": [None]},
            "'neg_ids' must hold non-empty",
        ),
        ("[1, 2]", "expected a JSON object, got list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_training_jsonl_bad_rows(tmp_path, row, message):
    path = _jsonl(tmp_path / "train.jsonl", [{"query": "fine", "pos_doc": "fine"}, row])
    with pytest.raises(BidirError, match=rf"^{path}:2: .*{message}"):
        list(read_training_examples(path))


def test_training_jsonl_warns_about_unknown_fields(tmp_path):
    path = _jsonl(tmp_path / "train.jsonl", [{"query": "q", "pos_doc": "p", "neg_docs": ["typo"]}])
    with pytest.warns(UserWarning, match="ignoring unknown field.*neg_docs"):
        assert len(list(read_training_examples(path))) == 1


def test_training_tsv(tmp_path):
    plain = tmp_path / "pairs.tsv"
    plain.write_text("a1\tp1\na2\tp2\tn1\tn2\r\n\n", encoding="utf-8")
    assert [(e.query, e.positives, e.negatives, e.origin) for e in read_training_examples(plain)] == [
        ("a1", ("p1",), (), f"{plain}:1"),
        ("a2", ("p2",), ("n1", "n2"), f"{plain}:2"),
    ]
    headed = tmp_path / "triplets.tsv"
    headed.write_text("anchor\tpositive\tnegative\tsource_split\na\tp\tn\tdev\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="ignoring column.*source_split"):
        rows = list(read_training_examples(headed))
    assert [(e.query, e.positives, e.negatives) for e in rows] == [("a", ("p",), ("n",))]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\tp\nonly-one-column\n", r":2: expected anchor<TAB>positive"),
        ("a\tp\nb\t \n", r":2: empty positive \(column 2\)"),
        ("a\tp\nb\tp\t\n", r":2: empty negative \(column 3\)"),
        ("anchor\tpositive\tnegative\nb\tp\n", r":2: expected 3 tab-separated columns"),
    ],
)
def test_training_tsv_bad_rows(tmp_path, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BidirError, match=message):
        list(read_training_examples(path))


@pytest.mark.parametrize("name", ["bad.tsv", "bad.jsonl"])
def test_invalid_utf8_names_file_and_line(tmp_path, name):
    path = tmp_path / name
    good = b'{"query": "q", "pos_doc": "p"}\n' if name.endswith("jsonl") else b"a\tp\n"
    path.write_bytes(good + good + b"caf\xe9\tp\n")
    with pytest.raises(BidirError, match=rf"^{path}:3: invalid UTF-8"):
        list(read_training_examples(path))


def test_training_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(BidirError, match="unknown training data format '.csv'"):
        list(read_training_examples(tmp_path / "x.csv"))
    with pytest.raises(BidirError, match="no such file"):
        list(read_training_examples(tmp_path / "missing.jsonl"))


def _beir(folder, corpus=None, queries=None, qrels=None):
    (folder / "qrels").mkdir(parents=True)
    _jsonl(
        folder / "corpus.jsonl",
        corpus
        or [
            {"_id": "d1", "title": "Title", "text": "body one"},
            {"_id": "d2", "title": "", "text": "body two"},
            {"_id": 3, "text": "body three"},
        ],
    )
    _jsonl(
        folder / "queries.jsonl",
        queries or [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "unjudged"}],
    )
    (folder / "qrels" / "test.tsv").write_text(qrels or "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\t3\t0\n")
    return folder


def test_beir_folder(tmp_path):
    data = load_retrieval(_beir(tmp_path / "beir"))
    assert data.corpus == {"d1": "Title body one", "d2": "body two", "3": "body three"}
    assert data.queries == {"q1": "first"}  # only the queries judged in this split, as BEIR does
    assert data.qrels == {"q1": {"d1": 2, "3": 0}}


@pytest.mark.parametrize(
    ("part", "content", "message"),
    [
        ("qrels", "q1\tnope\t1\n", r"qrels/test.tsv:1: unknown document id 'nope'"),
        ("qrels", "query-id\tcorpus-id\tscore\nq9\td1\t1\n", r"qrels/test.tsv:2: unknown query id 'q9'"),
        ("qrels", "q1\td1\thigh\n", r"qrels/test.tsv:1: score 'high' is not an integer"),
        ("qrels", "q1\td1\n", r"qrels/test.tsv:1: expected query-id<TAB>corpus-id<TAB>score"),
        ("qrels", "q1\td1\t1\nq1\td1\t2\n", r"qrels/test.tsv:2: duplicate judgment"),
        (
            "corpus",
            [{"_id": "d1", "text": "x"}, {"_id": "d1", "text": "y"}],
            r"corpus.jsonl:2: duplicate document id",
        ),
        ("corpus", [{"_id": "d1", "title": "t"}], r"corpus.jsonl:1: missing field 'text'"),
        ("corpus", [{"text": "x"}], r"corpus.jsonl:1: missing field '_id'"),
        ("corpus", [{"_id": "d1", "text": 5}], r"corpus.jsonl:1: field 'text' must be a string, got int"),
        (
            "queries",
            [{"_id": "q1", "text": ["x"]}],
            r"queries.jsonl:1: field 'text' must be a string, got list",
        ),
    ],
)
def test_beir_bad_rows(tmp_path, part, content, message):
    folder = _beir(tmp_path / "beir", **{part: content})
    with pytest.raises(BidirError, match=message):
        load_retrieval(folder)


def test_beir_empty_documents_are_kept_with_a_warning(tmp_path):
    folder = _beir(
        tmp_path / "beir", corpus=[{"_id": "d1", "text": "x"}, {"_id": "3", "title": " ", "text": ""}]
    )
    with pytest.warns(UserWarning, match=r"corpus.jsonl: 1 documents have no title and no text \(lines 2\)"):
        assert load_retrieval(folder).corpus == {"d1": "x", "3": ""}


def test_beir_missing_split_and_bad_utf8(tmp_path):
    folder = _beir(tmp_path / "beir")
    with pytest.raises(BidirError, match=r"no qrels/dev.tsv \(splits found: test\)"):
        load_retrieval(folder, split="dev")
    with pytest.raises(BidirError, match="not a BEIR folder"):
        load_retrieval(tmp_path / "nowhere")
    with (folder / "corpus.jsonl").open("ab") as f:
        f.write(b'{"_id": "d9", "text": "\xff"}\n')
    with pytest.raises(BidirError, match=r"corpus.jsonl:4: invalid UTF-8"):
        load_retrieval(folder)


def test_lone_surrogate_is_a_bad_row_with_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(f'{{"id": "a", "text": "fine \\ud83d\\ude00 pair"}}\n{{"id": "b", "text": {LONE}}}\n')
    rows = read_jsonl(path)
    assert next(rows)[1]["text"] == "fine \U0001f600 pair"  # a surrogate pair is an emoji, not an error
    with pytest.raises(BidirError, match=r"rows\.jsonl:2: field 'text' holds a lone surrogate"):
        next(rows)
    path.write_text('{"id": "\\udc00", "text": "x"}\n{"id": "c", "text": "a \\\\ud83d is no escape"}\n')
    with pytest.raises(BidirError, match=r"rows\.jsonl:1: field 'id' holds a lone surrogate"):
        list(read_jsonl(path))


def test_lone_surrogate_in_eval_corpus_and_training_rows(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(f'{{"_id": "d0", "text": "ok"}}\n{{"_id": "d1", "text": {LONE}}}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q0", "text": "q"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    with pytest.raises(BidirError, match=r"corpus\.jsonl:2: field 'text' holds a lone surrogate"):
        load_retrieval(beir)
    train = tmp_path / "train.jsonl"
    train.write_text(f'{{"query": "q", "pos_doc": ["a"]}}\n{{"query": "q", "pos_doc": [{LONE}]}}\n')
    with pytest.raises(BidirError, match=r"train\.jsonl:2: field 'pos_doc' holds a lone surrogate"):
        list(read_training_examples(train))


def test_deeply_nested_json_line_is_one_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"x": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    with pytest.raises(BidirError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        list(read_jsonl(path))


def test_sts(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text('score\ts1\ts2\tgenre\n4.5\tA "quoted" man.\tA man.\tnews\n0\tx\ty\n', encoding="utf-8")
    pairs = read_sts(path)
    assert [(p.score, p.sentence1, p.sentence2) for p in pairs] == [
        (4.5, 'A "quoted" man.', "A man."),
        (0.0, "x", "y"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("high\ta\tb", "score 'high' is not a number"),
        ("1\ta", "expected score<TAB>sentence1<TAB>sentence2"),
        ("1\ta\t ", "sentence2 is empty"),
        ("nan\ta\tb", "score .nan. is not a finite number"),
    ],
)
def test_sts_bad_rows(tmp_path, line, message):
    path = tmp_path / "sts.tsv"
    path.write_text(f"1.0\ta\tb\n{line}\n", encoding="utf-8")
    with pytest.raises(BidirError, match=rf"{path}:2: {message}"):
        read_sts(path)


@pytest.mark.parametrize(
    ("first", "message"),
    [
        ("4,5\ta\tb", "score '4,5' is not a number"),  # a decimal comma, not a header
        ("high\ta cat sits\ta dog runs", "score 'high' is not a number"),  # sentences, not column names
    ],
)
def test_sts_first_row_is_a_header_only_when_it_looks_like_one(tmp_path, first, message):
    path = tmp_path / "sts.tsv"
    path.write_text(f"{first}\n1.0\tc\td\n", encoding="utf-8")
    with pytest.raises(BidirError, match=rf"{path}:1: {message}"):
        read_sts(path)
    # Column names are a header, whatever they are called (STS-B's, and others').
    for header in ("score\tsentence1\tsentence2\tgenre", "label\ttext_a\ttext_b", "Similarity\ts1\ts2"):
        path.write_text(f"{header}\n1.0\tc\td\n", encoding="utf-8")
        assert read_sts(path) == [StsPair("c", "d", 1.0)]


def test_stdlib_docstrings_deterministic_and_sane():
    train, dev = stdlib_train(), stdlib_dev()
    counts = stdlib_counts()
    _build.cache_clear()  # mine again from scratch: the same pairs and the same split
    assert stdlib_train() == train and stdlib_dev() == dev
    assert counts == stdlib_counts()
    assert len(train) >= 1000 and 150 <= len(dev.queries) <= 800, counts
    assert counts["train"] + counts["dev"] + counts["trivial"] + counts["duplicate"] == counts["docstrings"]
    assert list(read_training_examples("stdlib-docstrings")) == train
    assert load_retrieval("stdlib-docstrings") == dev
    for example in train:
        assert len(example.positives) == 1 and example.query.strip() and example.query != example.positives[0]
        assert example.query not in example.positives[0]  # the summary is the query, not part of the passage
    # One relevant passage per dev query; every passage is in the corpus; no text shared between the splits.
    assert all(len(judged) == 1 and set(judged) <= set(dev.corpus) for judged in dev.qrels.values())
    assert set(dev.queries) == set(dev.qrels)
    # Split by module: no dev passage comes from a module that has a train pair (origin is "path:line").
    root = Path(sysconfig.get_paths()["stdlib"])
    train_files = {Path(e.origin.rsplit(":", 1)[0]) for e in train}
    for doc_id in dev.corpus:
        parts = doc_id.split(".")
        candidates = [root.joinpath(*parts[:n]) for n in range(len(parts), 0, -1)]
        files = [f for c in candidates for f in (c.with_suffix(".py"), c / "__init__.py") if f.is_file()]
        assert files and files[0] not in train_files, doc_id
    assert not {e.query for e in train} & set(dev.queries.values())
    assert len({e.positives[0] for e in train} | set(dev.corpus.values())) == len(train) + len(dev.corpus)
    # One function per split now (stdlib_train / stdlib_dev): the split a caller can still get wrong is the one
    # load_retrieval is given with the dataset's name.
    with pytest.raises(BidirError, match="one evaluation split, 'dev', not 'train'"):
        load_retrieval("stdlib-docstrings", split="train")


SHARED_DATA = Path(
    os.environ.get("BIDIR_DATA") or Path(__file__).resolve().parents[3].parent / "shared" / "data"
)


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder; set BIDIR_DATA to it)")
    return path


def test_real_sts_b():
    # Row counts from ../shared/data/stsb/README.md.
    dev, train = read_sts(_shared("stsb/sts-dev.tsv")), read_sts(_shared("stsb/sts-train.tsv"))
    assert (len(dev), len(train)) == (1500, 5749)
    assert dev[0] == StsPair("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert all(0.0 <= p.score <= 5.0 for p in dev + train)


def test_real_cranfield():
    # 1,400 docs / 225 queries / 1,612 graded qrels, all 225 queries judged (../shared/data/cranfield/README.md).
    with pytest.warns(UserWarning, match="2 documents have no title and no text"):  # docs 471 and 995
        data = load_retrieval(_shared("cranfield"))
    assert (len(data.corpus), len(data.queries), sum(map(len, data.qrels.values()))) == (1400, 225, 1612)
    assert data.qrels["1"]["184"] == 3 and {r for j in data.qrels.values() for r in j.values()} <= {
        1,
        2,
        3,
        4,
    }


def test_real_snli_triplets():
    path = _shared("snli_pairs/snli_triplets.tsv")
    with pytest.warns(UserWarning, match="ignoring column.*source_split"):
        rows = list(read_training_examples(path))
    assert len(rows) == 6339  # ../shared/data/snli_pairs/README.md
    assert all(len(r.positives) == 1 and len(r.negatives) == 1 for r in rows)
    assert rows[0].query == "Two women are embracing while holding to go packages ."
    assert rows[0].negatives == ("The men are fighting outside a deli .",) and rows[0].origin == f"{path}:2"
