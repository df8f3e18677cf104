"""train -> export-onnx -> batch-embed (torch and onnxruntime) -> bidir-eval, through the installed CLIs.

Two chains: a tiny random model trained on 2 CPU ranks (gloo) for a few steps, and the embedded default itself (a
real 30-layer model and tokenizer). The embedded default is not trained here: .ci/run trains the default recipe
with the same short overrides (`nox -s train -- --config default schedule.max_steps=2 eval.dev=null`), and
`nox -s demo` trains it in full, then runs export-onnx, batch-embed and bidir-eval on the checkpoint it wrote. The
onnxruntime and torch backends must agree to 1e-4 (fp32 on both sides; the export itself is verified to 1e-4
against PyTorch), and bidir-eval must score the written corpus embeddings like it scores the model's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clis import run

from bidir_core.datasets import stdlib_dev, stdlib_train
from bidir_core.embeddings_artifact import read_embeddings
from bidir_core.testing import tiny_encoder


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_data(root: Path, n_train: int, n_queries: int) -> tuple[Path, Path]:
    """Training JSONL (stdlib docstring pairs, another row's passage as the hard negative) and a BEIR folder
    (a slice of the stdlib dev split)."""
    train = stdlib_train()[:n_train]
    rows = [
        {"query": ex.query, "pos_doc": ex.positives[0], "neg_doc": [train[(i + 1) % len(train)].positives[0]]}
        for i, ex in enumerate(train)
    ]
    train_file = _write_jsonl(root / "train.jsonl", rows)

    dev = stdlib_dev()
    qids = sorted(dev.qrels)[:n_queries]
    dids = sorted({d for q in qids for d in dev.qrels[q]})
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    _write_jsonl(beir / "corpus.jsonl", ({"_id": d, "title": "", "text": dev.corpus[d]} for d in dids))
    _write_jsonl(beir / "queries.jsonl", ({"_id": q, "text": dev.queries[q]} for q in qids))
    qrels = "".join(f"{q}\t{d}\t{g}\n" for q in qids for d, g in dev.qrels[q].items())
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return train_file, beir


def embed_eval_chain(root: Path, final: Path | str, beir: Path, *, against_model: bool = True) -> None:
    """export-onnx -> batch-embed with both backends -> equal embeddings -> bidir-eval reads them back and, with
    against_model, scores them like it scores the model's own (a property of bidir-eval's reading of the artifact,
    whatever the model; test_families.py leaves it to the chains here)."""
    run("export-onnx", final, root / "onnx")
    corpus = beir / "corpus.jsonl"
    outputs = {}
    for backend, model in (("torch", final), ("onnxruntime", root / "onnx")):
        out = root / f"emb-{backend}"
        run("batch-embed", "--model", model, "--input", corpus, "--output", out, "--id-field", "_id",
            "--backend", backend, "--shard-size", "7")  # fmt: skip
        emb = read_embeddings(out)
        outputs[backend] = dict(zip(emb.ids(), emb.embeddings(), strict=True))
    assert outputs["torch"].keys() == outputs["onnxruntime"].keys()
    ids = sorted(outputs["torch"])
    a = np.stack([outputs["torch"][i] for i in ids])
    b = np.stack([outputs["onnxruntime"][i] for i in ids])
    assert a.dtype == np.float32 and np.abs(a - b).max() <= 1e-4

    reports = {}
    evals = {"written": ["--corpus-embeddings", root / "emb-onnxruntime"]}
    if against_model:
        evals["model"] = []
    for name, extra in evals.items():
        out = root / f"eval-{name}.json"
        run("bidir-eval", final, "--retrieval", beir, *extra, "--json", out)
        reports[name] = json.loads(out.read_text())
    assert 0 <= reports["written"]["metrics"]["ndcg@10"] <= 1, reports["written"]
    if not against_model:
        return
    for key in ("ndcg@10", "recall@100", "mrr@10", "map@100"):
        # Same model, embeddings equal to 1e-4: rankings can only differ between documents whose scores are
        # within ~1e-4 of each other, which moves a metric by at most one rank swap.
        assert reports["written"]["metrics"][key] == pytest.approx(reports["model"]["metrics"][key], abs=0.02)


def test_tiny_model_two_ranks(tmp_path):
    train_file, beir = write_data(tmp_path, n_train=16, n_queries=12)
    tiny_encoder().save_pretrained(tmp_path / "tiny")
    run("torchrun", "--nproc-per-node", "2", "-m", "bidir_train", "--config", "tiny",
        f"model.path={tmp_path / 'tiny'}", f"data.train={train_file}", f"logging.output_dir={tmp_path / 'run'}",
        "schedule.max_steps=4", f"eval.dev={beir}", "eval.every_steps=2")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    # In-loop evaluation of the FSDP-sharded model on both ranks: before training, every 2 steps, at the end.
    assert [r["step"] for r in rows if "dev/ndcg@10" in r] == [0, 2, 4]
    embed_eval_chain(tmp_path, tmp_path / "run" / "final", beir)


@pytest.mark.slow
def test_embedded_default_chain(tmp_path, embedded_default):
    _, beir = write_data(tmp_path, n_train=0, n_queries=16)
    embed_eval_chain(tmp_path, embedded_default, beir)
