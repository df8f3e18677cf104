"""bidir-eval: the report and JSON it writes agree with the library functions; bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bidir_core.datasets import load_retrieval, read_sts
from bidir_core.encoder import BiEncoder
from bidir_core.eval_cli import main
from bidir_core.evaluation import evaluate_retrieval, evaluate_sts
from bidir_core.testing import tiny_encoder

SHARED_DATA = Path(
    os.environ.get("BIDIR_DATA") or Path(__file__).resolve().parents[3].parent / "shared" / "data"
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return tiny_encoder().save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def beir(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = ["sort a list in place", "open a file for reading", "parse json text", "start a new thread"]
    rows = [json.dumps({"_id": f"d{i}", "title": "", "text": t}) for i, t in enumerate(docs)]
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
