"""bidir-mine: positives never come back as negatives, the margin rule, the output format, bad input, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bidir_core.datasets import TrainingExample, read_training_examples
from bidir_core.errors import BidirError
from bidir_train.mine import MineConfig, main, mine, mine_negatives


class FakeEncoder:
    """Hand-made unit vectors per text, so every cosine is known exactly."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors

    def _encode(self, texts, batch_size=32, normalize=True, show_progress_bar=False):
        out = np.array([self.vectors[t] for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    encode_queries = encode_documents = _encode


def _unit(cos: float, axis: int) -> list[float]:
    """A unit vector at cosine `cos` to e0, its remainder on `axis` (so candidates are not similar to each other)."""
    v = [0.0] * 6
    v[0], v[axis] = cos, math.sqrt(1 - cos**2)
    return v


def _margin_case(margin: float) -> tuple[str, ...]:
    vectors = {"q": _unit(1.0, 1), "pos": _unit(0.8, 1), "near": _unit(0.77, 2), "far": _unit(0.75, 3)}
    vectors["low"] = _unit(0.1, 4)
    example = TrainingExample(query="q", positives=("pos",))
    corpus = [(None, t) for t in ("pos", "near", "far", "low")]
    rows, counts = mine_negatives(
        FakeEncoder(vectors), [example], corpus, top_k=4, num_negatives=2, margin=margin, device="cpu"
    )
    assert counts["dropped_positive"] == 1
    return rows[0].negatives


def test_margin_drops_candidates_too_close_to_the_positive():
    # positive score 0.8: margin 0.95 -> threshold 0.76, so 0.77 goes and 0.75 stays; margin 1.0 keeps 0.77
    assert _margin_case(0.95) == ("far", "low")
    assert _margin_case(1.0) == ("near", "far")


def test_skip_top_leaves_out_the_best_candidates_that_are_not_positives():
    # Ranked: pos 0.8 (a positive: no rank), near 0.77, far 0.75, low 0.1, lowest 0.05.
    vectors = {"q": _unit(1.0, 1), "pos": _unit(0.8, 1), "near": _unit(0.77, 2), "far": _unit(0.75, 3)}
    vectors |= {"low": _unit(0.1, 4), "lowest": _unit(0.05, 5)}
    example = TrainingExample(query="q", positives=("pos",))
    corpus = [(None, t) for t in ("lowest", "pos", "near", "far", "low")]

    def negatives(skip_top, margin):
        rows, counts = mine_negatives(
            FakeEncoder(vectors),
            [example],
            corpus,
            top_k=5,
            num_negatives=2,
            margin=margin,
            skip_top=skip_top,
        )
        assert counts["dropped_positive"] == 1 and counts["skipped_top"] == skip_top
        return rows[0].negatives

    assert negatives(0, 1.0) == ("near", "far")
    assert negatives(1, 1.0) == ("far", "low")
    assert negatives(2, 1.0) == ("low", "lowest")
    # The skipped ranks count before the margin: near is skipped, not dropped by it, and far still passes it.
    assert negatives(1, 0.95) == ("far", "low")


def test_positives_by_text_and_id_and_the_query_are_never_negatives():
    vectors = {"q": _unit(1.0, 1), "p": _unit(0.5, 1), " p\t": _unit(0.99, 2), "same id": _unit(0.98, 3)}
    vectors |= {"q ": _unit(0.97, 4), "other": _unit(0.3, 5)}
    example = TrainingExample(query="q", positives=("p",), positive_ids=("d1",))
    corpus = [("d0", " p\t"), ("d1", "same id"), ("d2", "q "), ("d3", "other"), ("d4", "p")]
    vectors[" p\t"] = vectors["p"]  # same text after whitespace normalisation: the positive
    rows, counts = mine_negatives(
        FakeEncoder(vectors), [example], corpus, top_k=5, num_negatives=3, margin=1.0
    )
    assert rows[0].negatives == ("other",)
    assert rows[0].negative_ids == ("d3",)  # a row keyed by id keeps the mined ids
    assert counts["dropped_positive"] == 3 and counts["short_rows"] == 1


def _pair_rows(n=30):
    return [
        {
            "query": f"how to {w} item {i}",
            "pos_doc": [f"{w} returns the value {i}", f"the {w} of {i}"],
            "pos_ids": [f"p{i}a", f"p{i}b"],
        }
        for i, w in enumerate(["sort", "parse", "open", "join", "split", "read"] * (n // 6))
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.filterwarnings(
    "ignore:.*rows have fewer than"
)  # a random model: the margin leaves some rows short
def test_tiny_model_never_returns_a_positive(tmp_path):
    from bidir_core.testing import tiny_encoder

    rows = _pair_rows()
    rows[0]["neg_doc"], rows[0]["neg_ids"] = ["an own negative"], ["n0"]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    # A BEIR corpus that holds every positive under its id (the second with a title: found by id only), and more.
    corpus = [{"_id": r["pos_ids"][0], "text": r["pos_doc"][0]} for r in rows]
    corpus += [{"_id": r["pos_ids"][1], "title": "T", "text": r["pos_doc"][1]} for r in rows]
    corpus += [{"_id": f"x{i}", "title": "", "text": f"unrelated passage number {i}"} for i in range(20)]
    _write_jsonl(tmp_path / "corpus.jsonl", corpus)
    out = tmp_path / "out" / "mined.jsonl"
    cfg = MineConfig("unused", str(train), str(out), corpus=str(tmp_path), margin=1.0, progress=False)
    summary = mine(cfg, encoder=tiny_encoder())
    mined = list(read_training_examples(out))  # the output is valid training data
    assert [ex.query for ex in mined] == [r["query"] for r in rows]
    assert summary["rows"] == len(rows) and summary["dropped_positive"] > 0
    titled = {f"T {r['pos_doc'][1]}" for r in rows}
    for ex, row in zip(mined, rows, strict=True):
        assert ex.positives == tuple(row["pos_doc"]) and ex.positive_ids == tuple(row["pos_ids"])
        assert not set(ex.negatives) & (set(row["pos_doc"]) | {f"T {row['pos_doc'][1]}"})
        assert not set(ex.negative_ids) & set(row["pos_ids"])
        assert len(set(ex.negatives)) == len(ex.negatives) <= 4
    negatives = [n for ex in mined for n in ex.negatives]
    assert sum(n in titled for n in negatives) > 0  # other rows' positives are fair negatives
    assert summary["short_rows"] == sum(len(ex.negatives) < 4 for ex in mined) < len(rows)
    assert mined[0].negatives[0] == "an own negative" and mined[0].negative_ids[0] == "n0"  # kept first


@pytest.mark.filterwarnings("ignore:.*rows have fewer than")
def test_default_corpus_is_the_rows_own_passages_and_keep_existing(tmp_path, train_jsonl):
    from bidir_core.testing import tiny_encoder

    encoder = tiny_encoder()
    source = list(read_training_examples(train_jsonl))
    for keep in (True, False):
        out = tmp_path / f"keep-{keep}.jsonl"
        cfg = MineConfig("unused", str(train_jsonl), str(out), keep_existing=keep, margin=1.0, progress=False)
        mine(cfg, encoder=encoder)
        mined = list(read_training_examples(out))
        assert len(mined) == len(source)
        pool = {p for ex in source for p in (*ex.positives, *ex.negatives)}
        for ex, old in zip(mined, source, strict=True):
            assert ex.query == old.query and ex.positives == old.positives
            assert set(ex.negatives) <= pool and not set(ex.negatives) & set(old.positives)
            assert len(set(ex.negatives)) == len(ex.negatives) <= 4 and ex.negative_ids == ()
            if keep:
                assert ex.negatives[:3] == old.negatives  # the row's own first, mined ones after
        assert any(len(ex.negatives) == 4 for ex in mined)


def test_bad_input(tmp_path, train_jsonl):
    with pytest.raises(BidirError, match="no such file"):
        mine(MineConfig("unused", str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl")))
    out = tmp_path / "exists.jsonl"
    out.write_text("old\n")
    with pytest.raises(BidirError, match="already exists"):
        mine(MineConfig("unused", str(train_jsonl), str(out)))
    assert out.read_text() == "old\n" and not list(tmp_path.glob("*.tmp"))
    for margin in (0.0, 1.5, -0.1):
        with pytest.raises(BidirError, match="margin must be in"):
            MineConfig("m", "t", "o", margin=margin)
    with pytest.raises(BidirError, match="top_k must be a positive integer"):
        MineConfig("m", "t", "o", top_k=0)
    for skip in (-1, True, 1.5):
        with pytest.raises(BidirError, match="skip_top must be a non-negative integer"):
            MineConfig("m", "t", "o", skip_top=skip)
    with pytest.raises(
        BidirError, match=r"top_k \(30\) must be at least skip_top \+ num_negatives \(27 \+ 4\)"
    ):
        MineConfig("m", "t", "o", skip_top=27)
    with pytest.raises(BidirError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        MineConfig("m", "t", "o", precision="fp16")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(BidirError, match="no passages"):
        mine(
            MineConfig(
                "unused", str(train_jsonl), str(tmp_path / "o.jsonl"), corpus=str(tmp_path / "empty.txt")
            )
        )


@pytest.mark.filterwarnings("ignore:.*rows have fewer than")
def test_cli(tmp_path, tiny_checkpoint, train_jsonl, capsys):
    corpus = tmp_path / "passages.txt"
    corpus.write_text("".join(f"passage about topic {i}\n" for i in range(12)))
    out = tmp_path / "mined.jsonl"
    args = [str(tiny_checkpoint), "--train", str(train_jsonl), "--output", str(out), "--corpus", str(corpus)]
    assert main([*args, "--no-keep-existing", "--num-negatives", "2", "--no-progress"]) == 0
    assert "24 rows" in capsys.readouterr().out
    mined = list(read_training_examples(out))
    assert all(len(ex.negatives) <= 2 for ex in mined) and any(ex.negatives for ex in mined)
    assert all(n.startswith("passage about topic") for ex in mined for n in ex.negatives)  # not their own
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left beside the output
    assert main([*args, "--no-progress"]) == 2  # the output exists now
    assert "bidir-mine: error: " in capsys.readouterr().err
    assert main([*args, "--margin", "2", "--overwrite"]) == 2
    assert "margin must be in (0, 1]" in capsys.readouterr().err
    assert main([*args, "--skip-top", "3", "--overwrite", "--no-progress"]) == 0
    assert ", 72 skipped as the top ranks, " in capsys.readouterr().out  # 3 for each of the 24 rows
    assert main([*args, "--precision", "bf16", "--device", "cpu", "--overwrite", "--no-progress"]) == 0
    assert "24 rows" in capsys.readouterr().out


def test_a_home_relative_output_is_written_where_it_was_checked(tiny_checkpoint, train_jsonl, home_elsewhere):
    """--output ~/mined.jsonl (quoted, or from Python) lands in the home folder, not in a folder named "~"."""
    home, cwd = home_elsewhere
    args = [str(tiny_checkpoint), "--train", str(train_jsonl), "--output", "~/mined.jsonl", "--no-progress"]
    assert main(args) == 0
    assert (home / "mined.jsonl").is_file() and list(cwd.iterdir()) == []
    assert main(args) == 2  # and the check that refuses an existing output looks at the same file


def test_rows_sharing_a_query_share_positives():
    """An SNLI premise with two entailments is two rows: neither row's positive may be mined for the other."""
    vectors = {"q": _unit(1.0, 1), "p1": _unit(0.9, 1), "p2": _unit(0.8, 2), "n": _unit(0.3, 3)}
    rows = [TrainingExample("q", ("p1",)), TrainingExample("q", ("p2",))]
    corpus = [(None, t) for t in ("p1", "p2", "n")]
    mined, counts = mine_negatives(
        FakeEncoder(vectors), rows, corpus, top_k=3, num_negatives=1, margin=1.0, device="cpu"
    )
    # without sharing, row 1 would take p2 (0.8 < its positive's 0.9) as a negative
    assert [ex.negatives for ex in mined] == [("n",), ("n",)]
    assert counts["dropped_positive"] == 4


def test_nan_model_is_an_error_and_writes_nothing(tmp_path, train_jsonl):
    import torch

    from bidir_core.testing import tiny_encoder

    encoder = tiny_encoder()
    with torch.no_grad():
        for p in encoder.parameters():
            p.fill_(float("nan"))
    out = tmp_path / "mined.jsonl"
    cfg = MineConfig("unused", str(train_jsonl), str(out), progress=False)
    with pytest.raises(BidirError, match=r"non-finite \(nan/inf\) embeddings for \d+ of \d+ passage texts"):
        mine(cfg, encoder=encoder)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_refused_before_the_embedding(tmp_path, train_jsonl):
    (tmp_path / "afile").write_text("x")

    cfg = MineConfig("unused", str(train_jsonl), str(tmp_path / "afile" / "mined.jsonl"), progress=False)
    with pytest.raises(BidirError, match=r"mined\.jsonl: cannot be written \(.*afile is not a folder\)"):
        mine(cfg, encoder=Untouched())


class Untouched:
    """An encoder a test expects never to be asked for embeddings."""

    def encode_documents(self, *a, **k):
        raise AssertionError("embedded before the input was checked")

    encode_queries = encode_documents


@pytest.mark.filterwarnings("ignore:.*rows have fewer than")
def test_rescore_writes_the_rerankers_scores_of_the_mined_rows(
    tmp_path, tiny_checkpoint, train_jsonl, capsys
):
    """--rescore: each written row carries the reranker's logit of its query with each positive and each (mined,
    filtered) negative, and reads back as training rows with teacher scores."""
    from bidir_core.cross_encoder import CrossEncoder, new_score_head
    from bidir_core.reranker_config import RerankerConfig
    from bidir_core.testing import tiny_model, tiny_tokenizer

    model = tiny_model(seed=3)
    reranker = CrossEncoder(model, tiny_tokenizer(), RerankerConfig(), new_score_head(model.config, seed=2))
    reranker.save_pretrained(tmp_path / "reranker")
    out = tmp_path / "scored.jsonl"
    args = [str(tiny_checkpoint), "--train", str(train_jsonl), "--output", str(out), "--no-progress"]
    assert main([*args, "--num-negatives", "4", "--rescore", str(tmp_path / "reranker")]) == 0
    plain = tmp_path / "plain.jsonl"
    assert main([*args[:-3], "--output", str(plain), "--no-progress", "--num-negatives", "4"]) == 0
    capsys.readouterr()
    scored, unscored = list(read_training_examples(out)), list(read_training_examples(plain))
    assert [(ex.query, ex.negatives) for ex in scored] == [(ex.query, ex.negatives) for ex in unscored]
    assert not any(ex.positive_scores for ex in unscored)
    loaded = CrossEncoder.from_pretrained(tmp_path / "reranker")
    for ex in scored[:3]:
        expected = loaded.predict([(ex.query, d) for d in (*ex.positives, *ex.negatives)])
        got = (*ex.positive_scores, *ex.negative_scores)
        assert got == pytest.approx(expected.tolist(), abs=1e-5)
        assert len(ex.negative_scores) == len(ex.negatives) >= 1
    assert len({s for ex in scored for s in ex.negative_scores}) > 1  # real scores, not a constant


def test_rescore_with_a_model_that_is_no_reranker_is_refused_before_mining(
    tmp_path, tiny_checkpoint, train_jsonl
):
    out = tmp_path / "scored.jsonl"
    cfg = MineConfig(
        str(tiny_checkpoint), str(train_jsonl), str(out), rescore=str(tiny_checkpoint), progress=False
    )
    with pytest.raises(BidirError, match="has no reranker head") as e:
        mine(cfg, encoder=Untouched())
    assert "\n" not in str(e.value) and not out.exists()


def test_drop_empty_rows_leaves_out_exactly_the_rows_without_a_negative(tmp_path, train_jsonl):
    """The corpus is one passage, the first row's positive: that row can get no negative, and the others get it
    only where it scores below their positive. --drop-empty-rows writes the same rows less the empty ones, and a
    file whose rows all end empty is refused, nothing written."""
    from bidir_core.testing import tiny_encoder

    encoder = tiny_encoder()
    first = next(iter(read_training_examples(train_jsonl)))
    corpus = tmp_path / "one.txt"
    corpus.write_text(first.positives[0] + "\n")
    kw = dict(corpus=str(corpus), keep_existing=False, margin=1.0, progress=False)
    full, dropped = tmp_path / "full.jsonl", tmp_path / "dropped.jsonl"
    mine(MineConfig("unused", str(train_jsonl), str(full), **kw), encoder=encoder)
    with pytest.warns(UserWarning, match="rows have fewer than") as caught:
        summary = mine(
            MineConfig("unused", str(train_jsonl), str(dropped), drop_empty_rows=True, **kw), encoder=encoder
        )
    every = [(ex.query, ex.negatives) for ex in read_training_examples(full)]
    kept = [(ex.query, ex.negatives) for ex in read_training_examples(dropped)]
    assert not every[0][1] and kept == [row for row in every if row[1]]
    assert summary["dropped_rows"] == len(every) - len(kept) >= 1
    # one passage, so every written row is short of num_negatives; the warning counts those rows, not the dropped
    short = sum(len(negatives) < MineConfig.num_negatives for _, negatives in kept)
    assert str(caught[0].message).startswith(f"{short} of {len(kept)} rows have fewer than")
    assert summary["short_rows"] == short  # the summary line counts the same rows
    assert "(0 got no mined negative)" in str(caught[0].message)

    alone = tmp_path / "alone.jsonl"
    alone.write_text(json.dumps({"query": first.query, "pos_doc": list(first.positives)}) + "\n")
    out = tmp_path / "none.jsonl"
    with pytest.raises(BidirError, match="no row got a negative"):
        mine(MineConfig("unused", str(alone), str(out), drop_empty_rows=True, **kw), encoder=encoder)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.filterwarnings("ignore:.*rows have fewer than")
def test_fewer_negatives_are_the_first_of_more(tmp_path):
    """num_negatives only stops the walk down the ranked candidates sooner: for rows without negatives of their
    own, mining 1 writes the rows of mining 3 cut to their first negative and its id, and drops the same rows
    (quality_domain derives its 1-negative rows this way), for rows keyed by id and for rows of text alone."""
    from bidir_core.testing import tiny_encoder

    encoder = tiny_encoder()
    for keyed in (True, False):
        fields = ("query", "pos_doc", "pos_ids") if keyed else ("query", "pos_doc")
        rows = [{k: r[k] for k in fields} for r in _pair_rows()]
        train = _write_jsonl(tmp_path / f"train-{keyed}.jsonl", rows)
        mined = {}
        for n in (1, 3):
            out = tmp_path / f"mined{n}-{keyed}.jsonl"
            kw = dict(num_negatives=n, margin=0.95, drop_empty_rows=True, progress=False)
            mine(MineConfig("unused", str(train), str(out), **kw), encoder=encoder)
            mined[n] = [json.loads(line) for line in out.read_text().splitlines()]
        # not a trivial case: some rows have several negatives, some were dropped
        assert max(len(r["neg_doc"]) for r in mined[3]) > 1 and len(mined[3]) < len(rows)
        assert all(("neg_ids" in r) is keyed for r in mined[3])
        cut = [{**r, **{k: r[k][:1] for k in ("neg_doc", "neg_ids") if k in r}} for r in mined[3]]
        assert mined[1] == cut
