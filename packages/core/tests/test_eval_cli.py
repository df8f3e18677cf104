"""bidir_core.eval_cli (bidir-eval): the report and JSON it writes agree with the library functions; bad input is
one line, exit 2, checked before the evaluation; corpus embeddings are refused unless they come from the model and
prompt evaluated."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bidir_core.artifacts import checkpoint_fingerprint
from bidir_core.bm25 import bm25_run
from bidir_core.datasets import load_retrieval, read_sts
from bidir_core.embeddings_artifact import EmbeddingsManifest, Shard, write_embeddings_manifest, write_shard
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.eval_cli import main
from bidir_core.evaluation import evaluate_retrieval, evaluate_sts
from bidir_core.fusion import fuse, fuse_reranked
from bidir_core.metrics import retrieval_metrics
from bidir_core.runs import embedder_run, rerank_run

SHARED_DATA = Path(
    os.environ.get("BIDIR_DATA") or Path(__file__).resolve().parents[3].parent / "shared" / "data"
)


DOCS = ["sort a list in place", "open a file for reading", "parse json text", "start a new thread"]


@pytest.fixture(scope="module")
def tiny_checkpoint(encoder, tmp_path_factory):
    return encoder.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def beir(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    rows = [json.dumps({"_id": f"d{i}", "title": "", "text": t}) for i, t in enumerate(DOCS)]
    (folder / "corpus.jsonl").write_text("\n".join(rows) + "\n")
    queries = ["how to sort", "read a file", "decode json"]
    rows = [json.dumps({"_id": f"q{i}", "text": t}) for i, t in enumerate(queries)]
    (folder / "queries.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td0\t2\nq1\td1\t1\nq2\td2\t1\n"
    )
    return folder


def test_retrieval_report_and_json(tiny_checkpoint, beir, tmp_path, capsys):
    out = tmp_path / "runs" / "r.json"
    assert main([str(tiny_checkpoint), "--retrieval", str(beir), "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "retrieval" and report["model"] == str(tiny_checkpoint)
    assert report["counts"] == {"queries": 3, "documents": 4, "judgments": 3}
    assert set(report["timing"]) == {"data_s", "model_s", "eval_s", "total_s"}
    want = evaluate_retrieval(BiEncoder.from_pretrained(tiny_checkpoint), load_retrieval(beir))
    assert report["metrics"] == pytest.approx(want)
    assert {"ndcg@10", "recall@100", "mrr@10", "map@100"} <= set(report["metrics"])
    assert f"ndcg@10     {want['ndcg@10']:.4f}" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_a_home_relative_json_is_written_where_it_was_checked(tiny_checkpoint, beir, home_elsewhere):
    home, cwd = home_elsewhere
    args = [str(tiny_checkpoint), "--retrieval", str(beir), "--json", "~/r.json", "--no-progress"]
    assert main(args) == 0
    assert json.loads((home / "r.json").read_text())["task"] == "retrieval" and list(cwd.iterdir()) == []


def test_sts_report_with_dim(tiny_checkpoint, tmp_path):
    sts = tmp_path / "sts.tsv"
    sts.write_text(
        "score\ts1\ts2\n5\tA cat sits.\tA cat is sitting.\n0\tA cat sits.\tStocks fell.\n2\ta b\tb c\n"
    )
    out = tmp_path / "s.json"
    assert (
        main([str(tiny_checkpoint), "--sts", str(sts), "--dim", "16", "--json", str(out), "--no-progress"])
        == 0
    )
    report = json.loads(out.read_text())
    assert report["task"] == "sts" and report["dim"] == 16 and report["counts"] == {"pairs": 3}
    want = evaluate_sts(BiEncoder.from_pretrained(tiny_checkpoint), read_sts(sts), dim=16)
    assert report["metrics"] == pytest.approx(want) and set(want) == {"spearman", "pearson"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dim", "999"], "dim=999 is larger than the model's embedding size 64"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--split", "dev"], "no qrels/dev.tsv"),
    ],
)
def test_bad_input_is_one_line(tiny_checkpoint, beir, tmp_path, capsys, extra, message):
    out = tmp_path / "r.json"
    assert main([str(tiny_checkpoint), "--retrieval", str(beir), "--json", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bidir-eval: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_qrels_row_named_before_model_load(beir, capsys):
    (beir / "qrels" / "test.tsv").write_text("q0\td0\t1\nq1\tmissing\t1\n")
    assert main(["/no/such/model", "--retrieval", str(beir)]) == 2
    assert "qrels/test.tsv:2: unknown document id 'missing'" in capsys.readouterr().err


def test_needs_exactly_one_task(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["m"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["m", "--retrieval", "x", "--sts", "y"])
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert (
        exit_.value.code == 0
        and "bidir-eval smollm2-135m --retrieval stdlib-docstrings" in capsys.readouterr().out
    )


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
    folder, docs = beir, DOCS
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


def test_unwritable_json_is_refused_before_the_evaluation(
    tiny_checkpoint, beir, tmp_path, capsys, monkeypatch
):
    (tmp_path / "afile").write_text("x")
    import bidir_core.evaluation

    def boom(*a, **k):
        raise AssertionError("evaluated before the output was checked")

    monkeypatch.setattr(bidir_core.evaluation, "evaluate_model", boom)
    assert (
        main([str(tiny_checkpoint), "--retrieval", str(beir), "--json", str(tmp_path / "afile" / "r.json")])
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


@pytest.mark.slow
def test_embedded_default_by_name(embedded_gguf, tmp_path):
    """bidir-eval loads the embedded default by name; its report is evaluate_sts on the same model (40 real STS-B
    dev pairs)."""
    dev = SHARED_DATA / "stsb" / "sts-dev.tsv"
    if not dev.is_file():
        pytest.skip(f"needs {dev} (set BIDIR_DATA to the shared data folder)")
    small = tmp_path / "sts.tsv"
    small.write_text(
        "".join(dev.read_text(encoding="utf-8").splitlines(keepends=True)[:41]), encoding="utf-8"
    )
    out = tmp_path / "o.json"
    assert main(["smollm2-135m", "--sts", str(small), "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["counts"] == {"pairs": 40} and report["dim"] == 576
    want = evaluate_sts(BiEncoder.from_pretrained("smollm2-135m"), read_sts(small))
    assert report["metrics"] == pytest.approx(want, abs=1e-6)


def test_bm25_first_stage(beir, tmp_path, capsys):
    out = tmp_path / "bm25.json"
    assert main(["bm25", "--retrieval", str(beir), "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    data = load_retrieval(beir)
    assert report["model"] == "bm25" and report["dim"] is None and "reranked" not in report
    assert report["device"] is None and report["precision"] is None  # no model ran
    assert report["metrics"] == pytest.approx(retrieval_metrics(bm25_run(data), data.qrels))
    assert report["metrics"]["recall@100"] == 1.0  # 4 documents: every one is in the run
    printed = capsys.readouterr().out
    assert printed.startswith(f"bm25 on {data.name} (retrieval: 3 queries, 4 documents, 3 judgments)\n")


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    from bidir_core.cross_encoder import CrossEncoder
    from bidir_core.testing import write_hf_llama

    folder = tmp_path_factory.mktemp("rr")
    decoder = write_hf_llama(folder / "decoder")
    return CrossEncoder.from_pretrained(decoder, new_head=True, seed=0).save_pretrained(folder / "reranker")


@pytest.mark.parametrize("first_stage", ["bm25", "embedder"])
def test_rerank_report_beside_the_first_stage(first_stage, tiny_checkpoint, reranker, beir, tmp_path, capsys):
    from bidir_core.cross_encoder import CrossEncoder

    model = "bm25" if first_stage == "bm25" else str(tiny_checkpoint)
    out = tmp_path / "r.json"
    argv = [
        model,
        "--retrieval",
        str(beir),
        "--rerank",
        str(reranker),
        "--rerank-top-k",
        "2",
        "--json",
        str(out),
    ]
    assert main([*argv, "--no-progress"]) == 0
    report = json.loads(out.read_text())
    data = load_retrieval(beir)
    if first_stage == "bm25":
        run = bm25_run(data)
    else:
        run = embedder_run(BiEncoder.from_pretrained(tiny_checkpoint), data)
    assert report["metrics"] == pytest.approx(retrieval_metrics(run, data.qrels))  # still the first stage's
    reranked = rerank_run(CrossEncoder.from_pretrained(reranker), data, run, 2)
    assert report["reranked"]["metrics"] == pytest.approx(retrieval_metrics(reranked, data.qrels), abs=1e-6)
    assert report["reranked"]["model"] == str(reranker) and report["reranked"]["top_k"] == 2
    assert report["reranked"]["counts"] == {"pairs": 6}  # 3 queries x their top 2
    assert set(report["reranked"]["timing"]) == {"model_s", "eval_s"}
    want = report["metrics"]["ndcg@10"], report["reranked"]["metrics"]["ndcg@10"]
    assert f"ndcg@10     {want[0]:>9.4f} {want[1]:>9.4f}" in capsys.readouterr().out


def test_precision_loads_the_embedder_and_the_reranker_in_its_dtype(
    tiny_checkpoint, reranker, beir, tmp_path, monkeypatch
):
    import torch

    from bidir_core.cross_encoder import CrossEncoder
    from bidir_core.evaluation import evaluate_model

    loads = []
    for cls in (BiEncoder, CrossEncoder):
        original = cls.from_pretrained.__func__

        def spy(klass, source, *args, _original=original, **kwargs):
            loads.append((klass.__name__, kwargs.get("dtype"), kwargs.get("device")))
            return _original(klass, source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    out = tmp_path / "r.json"
    argv = [str(tiny_checkpoint), "--retrieval", str(beir), "--rerank", str(reranker), "--rerank-top-k", "2"]
    assert main([*argv, "--device", "cpu", "--precision", "bf16", "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["precision"] == "bf16"
    assert loads == [("BiEncoder", torch.bfloat16, "cpu"), ("CrossEncoder", torch.bfloat16, "cpu")]
    monkeypatch.undo()
    data = load_retrieval(beir)
    run = embedder_run(BiEncoder.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16), data)
    assert report["metrics"] == pytest.approx(retrieval_metrics(run, data.qrels))
    reranked = rerank_run(CrossEncoder.from_pretrained(reranker, dtype=torch.bfloat16), data, run, 2)
    assert report["reranked"]["metrics"] == pytest.approx(retrieval_metrics(reranked, data.qrels), abs=1e-6)
    with pytest.raises(BidirError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        evaluate_model(str(tiny_checkpoint), retrieval=str(beir), precision="fp16")


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
def test_rerank_fusion_report_beside_the_reranked_run(fusion, reranker, beir, tmp_path, capsys):
    from bidir_core.cross_encoder import CrossEncoder

    out = tmp_path / "f.json"
    argv = ["bm25", "--retrieval", str(beir), "--rerank", str(reranker), "--rerank-top-k", "3"]
    assert main([*argv, "--rerank-fusion", fusion, "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    data = load_retrieval(beir)
    run = bm25_run(data)
    reranked = rerank_run(CrossEncoder.from_pretrained(reranker), data, run, 3)
    fused = fuse_reranked(reranked, run, fusion)
    assert report["reranked"]["metrics"] == pytest.approx(retrieval_metrics(reranked, data.qrels), abs=1e-6)
    assert report["reranked"]["fused"] == {
        "fusion": fusion,
        "metrics": pytest.approx(retrieval_metrics(fused, data.qrels), abs=1e-6),
    }
    printed = capsys.readouterr().out
    assert f"fused: the reranked run and the first stage's scores of its documents, by {fusion}" in printed
    assert "first  reranked     fused" in printed


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
def test_hybrid_report_beside_dense_and_bm25(fusion, tiny_checkpoint, reranker, beir, tmp_path, capsys):
    from bidir_core.cross_encoder import CrossEncoder

    out = tmp_path / "h.json"
    argv = [str(tiny_checkpoint), "--retrieval", str(beir), "--hybrid", fusion, "--rerank", str(reranker)]
    assert main([*argv, "--rerank-top-k", "3", "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    data = load_retrieval(beir)
    dense, lexical = embedder_run(BiEncoder.from_pretrained(tiny_checkpoint), data), bm25_run(data)
    fused = fuse([dense, lexical], fusion)
    assert report["metrics"] == pytest.approx(retrieval_metrics(dense, data.qrels))  # still the dense run's
    assert report["hybrid"]["fusion"] == fusion
    assert report["hybrid"]["bm25"] == pytest.approx(retrieval_metrics(lexical, data.qrels))
    assert report["hybrid"]["metrics"] == pytest.approx(retrieval_metrics(fused, data.qrels))
    reranked = rerank_run(CrossEncoder.from_pretrained(reranker), data, fused, 3)  # the fused run is reranked
    assert report["reranked"]["metrics"] == pytest.approx(retrieval_metrics(reranked, data.qrels), abs=1e-6)
    printed = capsys.readouterr().out
    assert f"hybrid: the dense run and BM25's fused by {fusion}" in printed
    assert "dense      bm25    hybrid  reranked" in printed


def test_hybrid_refusals(tiny_checkpoint, beir, tmp_path, capsys):
    sts = tmp_path / "sts.tsv"
    sts.write_text("5\tA cat sits.\tA cat is sitting.\n0\tA cat sits.\tStocks fell.\n")
    cases = [
        (
            ["bm25", "--retrieval", str(beir), "--hybrid", "rrf"],
            "give an embedder as the first stage, not bm25",
        ),
        (
            [str(tiny_checkpoint), "--sts", str(sts), "--hybrid", "rrf"],
            "give a retrieval dataset, not an STS file",
        ),
    ]
    for argv, message in cases:
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_rerank_refusals(tiny_checkpoint, reranker, beir, tmp_path, capsys):
    sts = tmp_path / "sts.tsv"
    sts.write_text("5\tA cat sits.\tA cat is sitting.\n0\tA cat sits.\tStocks fell.\n")
    out = tmp_path / "r.json"
    cases = [
        (
            [str(tiny_checkpoint), "--sts", str(sts), "--rerank", str(reranker)],
            "--rerank reorders a retrieval run",
        ),
        (
            ["bm25", "--retrieval", str(beir), "--rerank", str(reranker), "--rerank-top-k", "0"],
            "--rerank-top-k must",
        ),
        ([str(reranker), "--retrieval", str(beir)], f"{reranker} is a reranker: pass it as --rerank"),
        (
            ["bm25", "--retrieval", str(beir), "--rerank", str(tiny_checkpoint)],
            "is an embedder, not a reranker",
        ),
        (["bm25", "--retrieval", str(beir), "--rerank-top-k", "5"], "--rerank-top-k is for a reranker"),
        (["bm25", "--retrieval", str(beir), "--rerank-fusion", "rrf"], "--rerank-fusion fuses a reranker's"),
        (["bm25", "--sts", str(sts)], "bm25 is a retrieval first stage"),
        (["bm25", "--retrieval", str(beir), "--dim", "16"], "bm25 ranks by words"),
    ]
    for argv, message in cases:
        assert main([*argv, "--json", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("bidir-eval: error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()
