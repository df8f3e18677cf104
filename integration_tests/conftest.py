"""Fixtures for the cross-package tests: an isolated model cache, the embedded default where installed, and
README.md's production steps 0 and 1 run in miniature (shared by the README command tests)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from clis import run
from readme import command, miniature

from bidir_core.pytest_plugin import *  # noqa: F403 (the cache, hardware skips, embedded default: see there)
from bidir_core.testing import write_hf_llama


@pytest.fixture(scope="session")
def production(tmp_path_factory) -> dict:
    """Steps 0 and 1 of README.md's production path (MNTP, then contrastive training from the MNTP model, as the
    step-0 comment says), in a work folder; returns the /models, /data substitutions and the work folder."""
    from test_pipeline import write_data

    work = tmp_path_factory.mktemp("production")
    data = work / "data"
    data.mkdir()
    _, beir = write_data(data, n_train=16, n_queries=12)
    train = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(train):  # the recipe takes 4 hard negatives per row
        row["neg_doc"] = [train[(i + k) % len(train)]["pos_doc"] for k in (1, 2, 3, 4)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (data / "corpus.txt").write_text("".join(r["pos_doc"].replace("\n", " ") + "\n" for r in train))
    corpus = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    (data / "corpus").mkdir()
    for shard, rows in enumerate((corpus[::2], corpus[1::2])):  # Parquet shards with the step's column names
        table = pa.table({"doc_id": [r["_id"] for r in rows], "text": [r["text"] for r in rows]})
        pq.write_table(table, data / "corpus" / f"part-{shard}.parquet")
    # A Llama folder as a user has it (with its LM head, which MNTP trains), long enough for the recipe's 512.
    write_hf_llama(work / "Llama-3.2-1B", max_position_embeddings=4096)
    paths = {
        "/models/Llama-3.2-1B": work / "Llama-3.2-1B",
        "/data/corpus.txt": data / "corpus.txt",
        "/data/train.jsonl": data / "train.jsonl",
        "/data/beir/nq": beir,
        "/data/train-mined.jsonl": data / "train-mined.jsonl",
        "/data/corpus/*.parquet": data / "corpus" / "*.parquet",
        "/data/corpus-emb": data / "corpus-emb",
    }
    small = {"schedule.max_steps": "2", "schedule.global_batch_size": "4", "schedule.micro_batch_size": "2"}
    step0 = command(
        "README.md", "torchrun --nproc-per-node 8 -m bidir_train --config llama3_2_1b objective=mntp"
    )
    run(*_sized_training(step0, paths, small), cwd=work)
    # step 1 from the MNTP model: "then model.path below is runs/mntp-1b/final"
    step1 = command(
        "README.md", "torchrun --nproc-per-node 8 -m bidir_train --config llama3_2_1b model.path="
    )
    run(*_sized_training(step1, {**paths, "/models/Llama-3.2-1B": "runs/mntp-1b/final"}, small), cwd=work)
    final = work / "runs" / "1b" / "final"
    assert json.loads((final / "bidir.json").read_text())["max_length"] == 512  # the recipe's sequence length
    return {"work": work, "paths": paths}


@pytest.fixture(scope="session")
def production_onnx(production) -> str:
    """Step 1's checkpoint exported to ONNX in the work folder (its path there, onnx/1b): where TensorRT is missing,
    the README.md and containers/README.md steps that take step 2's engine run on onnxruntime with it. Exported
    once for both (the same command on the same checkpoint)."""
    run("export-onnx", "runs/1b/final", "onnx/1b", cwd=production["work"])
    return "onnx/1b"


def _sized_training(words, paths, settings) -> list[str]:
    """A README torchrun training command on 1 process with the settings given; the recipe's other values stay."""
    words = miniature(words, paths, options={"--nproc-per-node": "1"})
    return [*words, *(f"{k}={v}" for k, v in settings.items())]
