"""bidir-rescore: a reranker's scores for rows as they are, against CrossEncoder.predict; refusals before work."""

import json

import pytest

from bidir_core.datasets import read_training_examples
from bidir_core.errors import BidirError
from bidir_train.rescore import RescoreConfig, main, rescore


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    from bidir_core.cross_encoder import CrossEncoder, new_score_head
    from bidir_core.reranker_config import RerankerConfig
    from bidir_core.testing import tiny_model, tiny_tokenizer

    model = tiny_model(seed=3)
    folder = tmp_path_factory.mktemp("reranker") / "model"
    CrossEncoder(
        model, tiny_tokenizer(), RerankerConfig(), new_score_head(model.config, seed=2)
    ).save_pretrained(folder)
    return folder


def _rows(tmp_path):
    """Rows as bidir-mine writes them (ids, one row of two positives, one without negatives) plus stale scores."""
    rows = [
        {
            "query": "sort a list",
            "pos_doc": ["sorted returns a new list"],
            "neg_doc": ["open a file", "join paths"],
        },
        {"query": "read a file", "pos_doc": ["open a file", "read text"], "neg_doc": ["sort a list"]},
        {"query": "join paths", "pos_doc": ["os.path.join joins"], "neg_doc": []},
        {
            "query": "hash bytes",
            "pos_doc": ["hashlib digests"],
            "neg_doc": ["zlib compresses"],
            "pos_ids": ["d1"],
            "neg_ids": ["d2"],
            "pos_score": [9.0],
            "neg_scores": [-9.0],
        },
    ]
    path = tmp_path / "mined.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.filterwarnings("ignore:1 of 4 rows have no negatives")
def test_scores_are_the_rerankers_logits_and_the_rows_are_unchanged(tmp_path, reranker, capsys):
    from bidir_core.cross_encoder import CrossEncoder

    train, out = _rows(tmp_path), tmp_path / "scored.jsonl"
    assert main([str(reranker), "--train", str(train), "--output", str(out), "--no-progress"]) == 0
    assert "bidir-rescore: 4 rows" in capsys.readouterr().out
    before, after = list(read_training_examples(train)), list(read_training_examples(out))
    fields = ("query", "positives", "negatives", "positive_ids", "negative_ids")
    assert [[getattr(ex, f) for f in fields] for ex in after] == [
        [getattr(ex, f) for f in fields] for ex in before
    ]
    model = CrossEncoder.from_pretrained(reranker)
    for ex in after:
        expected = model.predict([(ex.query, d) for d in (*ex.positives, *ex.negatives)]).tolist()
        assert (*ex.positive_scores, *ex.negative_scores) == pytest.approx(expected, abs=1e-5)
    assert after[3].positive_scores != (9.0,)  # the stale teacher's scores are replaced
    # --precision bf16: the reranker's bf16 logits (the head stays fp32)
    import torch

    args = [str(reranker), "--train", str(train), "--output", str(out), "--overwrite", "--no-progress"]
    assert main([*args, "--precision", "bf16", "--device", "cpu"]) == 0
    model = CrossEncoder.from_pretrained(reranker, dtype=torch.bfloat16)
    for ex in read_training_examples(out):
        expected = model.predict([(ex.query, d) for d in (*ex.positives, *ex.negatives)]).tolist()
        assert (*ex.positive_scores, *ex.negative_scores) == pytest.approx(expected, abs=1e-5)


def test_one_warning_counts_the_rows_without_negatives(tmp_path, reranker):
    with pytest.warns(UserWarning, match=r"^1 of 4 rows have no negatives"):
        summary = rescore(
            RescoreConfig(str(reranker), str(_rows(tmp_path)), str(tmp_path / "o.jsonl"), progress=False)
        )
    assert summary["rows"] == 4 and summary["pairs"] == 9


def test_refusals_come_before_any_scoring_and_write_nothing(tmp_path, reranker, tiny_checkpoint):
    train = _rows(tmp_path)
    out = tmp_path / "scored.jsonl"
    out.write_text("not ours\n")
    with pytest.raises(BidirError, match="already exists"):
        rescore(RescoreConfig(str(reranker), str(train), str(out), progress=False))
    assert out.read_text() == "not ours\n"
    with pytest.raises(BidirError, match="is the input --train"):
        rescore(RescoreConfig(str(reranker), str(train), str(train), overwrite=True, progress=False))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(BidirError, match="no training rows"):
        rescore(RescoreConfig(str(reranker), str(empty), str(tmp_path / "a.jsonl"), progress=False))
    with pytest.raises(BidirError, match="has no reranker head") as e:  # an embedder is no teacher
        rescore(RescoreConfig(str(tiny_checkpoint), str(train), str(tmp_path / "b.jsonl"), progress=False))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()
    with pytest.raises(BidirError, match="batch_size must be a positive integer"):
        RescoreConfig(str(reranker), str(train), str(tmp_path / "c.jsonl"), batch_size=0)
    with pytest.raises(BidirError, match="precision must be one of"):
        RescoreConfig(str(reranker), str(train), str(tmp_path / "c.jsonl"), precision="fp16")


def test_a_bad_row_is_named_and_nothing_is_written(tmp_path, reranker, capsys):
    train, out = tmp_path / "bad.jsonl", tmp_path / "scored.jsonl"
    train.write_text(json.dumps({"query": "q", "pos_doc": ["p"]}) + "\n" + json.dumps({"query": "q2"}) + "\n")
    assert main([str(reranker), "--train", str(train), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bidir-rescore: error: ") and f"{train}:2" in err and err.count("\n") == 1
    assert not out.exists()
