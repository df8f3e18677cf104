"""Hostile and careless input to core's readers and bidir-eval (issue 14): each case is one line naming the file
(file:line or key) and leaves nothing behind; non-finite values are an error, not a result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bidir_core import tokenization
from bidir_core.artifacts import checkpoint_fingerprint
from bidir_core.checkpoint import EncoderConfig
from bidir_core.datasets import load_retrieval, read_training_examples
from bidir_core.datasets.lines import read_jsonl
from bidir_core.embeddings_artifact import EmbeddingsManifest, Shard, write_embeddings_manifest, write_shard
from bidir_core.errors import BidirError
from bidir_core.eval_cli import main
from bidir_core.testing import WORDS, tiny_encoder

LONE = '"bad \\ud83d text"'  # JSON text of a string holding half of an emoji


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder(EncoderConfig(max_length=48)).eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(encoder, tmp_path_factory):
    return encoder.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


# --- item 6 and 12: the shared JSONL reader ----------------------------------------------------------------------


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


# --- item 8: over-long texts are cut before tokenizing ------------------------------------------------------------


class _Recording:
    """A tokenizer proxy that records the characters of every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, texts, **kw):
        self.lengths += [len(t) for t in texts]
        return self.tokenizer(texts, **kw)

    def get_vocab(self):
        return self.tokenizer.get_vocab()


def test_long_text_keeps_the_same_tokens_and_embedding(encoder):
    tok = encoder.tokenizer
    rng = np.random.default_rng(0)
    long = " ".join(rng.choice(WORDS, 3000))  # ~20k characters, far past the cut
    limit = len(tokenization.cut_long_texts(tok, [long], 48)[0])
    assert limit == 4 * 48 * tokenization.max_token_chars(tok) < len(long)
    ids, cut = tokenization.tokenize(tok, [long], 48)
    full = tok([long], add_special_tokens=True, truncation=True, max_length=48)["input_ids"]
    assert cut == 1 and ids == full  # the same 48 tokens as truncating the whole text
    with pytest.warns(UserWarning, match="truncated"):
        got = encoder.encode(long)
    with torch.no_grad():
        ref = encoder(torch.tensor(full), torch.ones(1, 48, dtype=torch.long))[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    # A text that fits (max_length tokens of the longest tokens) is never cut.
    longest = max(tok.get_vocab(), key=len)
    assert len(longest * 47) <= limit and tokenization.cut_long_texts(tok, [longest * 47], 48) == [
        longest * 47
    ]


def test_huge_text_is_cut_before_the_tokenizer(encoder):
    rec = _Recording(encoder.tokenizer)
    huge = "embeddings search dense passages " * 600_000  # ~20 MB
    ids, cut = tokenization.tokenize(rec, ["short text", huge], 48)
    assert cut == 1 and len(ids[1]) == 48
    assert max(rec.lengths) <= 4 * 48 * tokenization.max_token_chars(encoder.tokenizer) < len(huge) / 1000


# --- item 4: corpus embeddings must come from the model and prompt evaluated --------------------------------------


@pytest.fixture
def beir(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = ["sort a list in place", "open a file for reading", "parse json text", "start a new thread"]
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    (folder / "queries.jsonl").write_text('{"_id": "q0", "text": "how to sort"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    return folder, docs


def _embeddings(folder, ids, emb, fingerprint, prompt="passage", prefix="passage: ", settings=None):
    folder.mkdir()
    write_shard(folder, 0, ids, emb)
    write_embeddings_manifest(
        folder,
        EmbeddingsManifest(
            model="m",
            model_fingerprint=fingerprint,
            dim=emb.shape[1],
            dtype=str(emb.dtype),
            normalize=True,
            prompt=prompt,
            prefix=prefix,
            input_fingerprint="sha256:11",
            settings=settings or {},
            shards=(Shard("part-00000.parquet", len(ids)),),
            complete=True,
        ),
    )
    return folder


def _eval(tiny_checkpoint, beir, emb, *extra):
    return main(
        [
            str(tiny_checkpoint),
            "--retrieval",
            str(beir),
            "--corpus-embeddings",
            str(emb),
            "--no-progress",
            *extra,
        ]
    )


def test_corpus_embeddings_of_another_model_prompt_or_nan_are_refused(
    tiny_checkpoint, encoder, beir, tmp_path, capsys
):
    folder, docs = beir
    ids = [f"d{i}" for i in range(4)]
    emb = encoder.encode_documents(docs)
    fp = checkpoint_fingerprint(tiny_checkpoint)
    ok = _embeddings(tmp_path / "ok", ids, emb, fp)
    assert _eval(tiny_checkpoint, folder, ok) == 0
    export = _embeddings(tmp_path / "export", ids, emb, "sha256:export", settings={"source_fingerprint": fp})
    assert _eval(tiny_checkpoint, folder, export) == 0  # made from an export of this checkpoint
    capsys.readouterr()
    other = _embeddings(tmp_path / "other", ids, emb, "sha256:another-model")
    assert _eval(tiny_checkpoint, folder, other) == 2
    err = capsys.readouterr().err
    assert "other: they were made by another model (m)" in err and "--allow-mismatched-embeddings" in err
    assert err.count("\n") == 1
    query = _embeddings(tmp_path / "query", ids, emb, fp, prompt="query", prefix="query: ")
    assert _eval(tiny_checkpoint, folder, query) == 2
    assert "made with prompt 'query'" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="MISMATCHED CORPUS EMBEDDINGS"):
        assert _eval(tiny_checkpoint, folder, other, "--allow-mismatched-embeddings") == 0
    nan = _embeddings(tmp_path / "nan", ids, np.full_like(emb, np.nan), fp)
    assert _eval(tiny_checkpoint, folder, nan, "--allow-mismatched-embeddings") == 2
    assert (
        "part-00000.parquet: non-finite (nan/inf) embeddings, the first of id 'd0'" in capsys.readouterr().err
    )


# --- item 12 and 13: bidir-eval's report ---------------------------------------------------------------------------


def test_unwritable_json_is_refused_before_the_evaluation(
    tiny_checkpoint, beir, tmp_path, capsys, monkeypatch
):
    (tmp_path / "afile").write_text("x")
    import bidir_core.evaluation

    def boom(*a, **k):
        raise AssertionError("evaluated before the output was checked")

    monkeypatch.setattr(bidir_core.evaluation, "evaluate_model", boom)
    assert (
        main(
            [str(tiny_checkpoint), "--retrieval", str(beir[0]), "--json", str(tmp_path / "afile" / "r.json")]
        )
        == 2
    )
    assert "r.json: cannot be written" in capsys.readouterr().err


def test_sts_with_equal_gold_scores_or_constant_cosines(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    sts = tmp_path / "sts.tsv"
    sts.write_text("3\tA cat sits.\tA cat is sitting.\n3\tA cat sits.\tStocks fell.\n3\ta b\tb c\n")
    assert main([str(tiny_checkpoint), "--sts", str(sts), "--json", str(tmp_path / "r.json")]) == 2
    assert "sts.tsv: all 3 gold scores are equal (3.0)" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    # A model whose cosines are all equal: the correlation is undefined -> null in the JSON, valid JSON.
    sts.write_text("5\tA cat sits.\tA cat is sitting.\n0\tA cat sits.\tStocks fell.\n2\ta b\tb c\n")
    from bidir_core.encoder import BiEncoder

    monkeypatch.setattr(
        BiEncoder, "encode_queries", lambda self, texts, **kw: np.ones((len(texts), 4), np.float32)
    )
    assert main([str(tiny_checkpoint), "--sts", str(sts), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())  # json.loads accepts NaN: check the text too
    assert report["metrics"] == {"spearman": None, "pearson": None}
    assert "NaN" not in (tmp_path / "r.json").read_text() and "undefined" in capsys.readouterr().out
