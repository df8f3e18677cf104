"""Corpus embedding speed and memory: bidir-serve's batch-embed vs sentence-transformers' encode, same model.

Throughput. Texts: Cranfield abstracts (../shared/data/cranfield/corpus.jsonl, title + text, ~250 tokens) and
STS-B train sentences (../shared/data/stsb/sts-train.tsv, ~15 tokens), mixed in a seeded shuffle (about 28 % long
documents, as 1,400 of 5,000), so lengths vary row to row. Both sides use the embedded default checkpoint (it loads
in sentence-transformers), the same dtype, the same batch size and no prompt:

- sentence-transformers: SentenceTransformer(checkpoint).encode(texts, batch_size) on the in-memory list, model
  loaded beforehand (its own length sorting, padding to the longest row of each batch).
- batch-embed:           embed_corpus(BatchEmbedConfig(...)) from a JSONL file to Parquet shards, end to end: reading
                         and checking the input, loading the model, fingerprinting it, tokenizing (on a background
                         thread), token-budget batches of at most the same batch size, writing the shards. The
                         torch backend runs each batch packed (no padding: its default on CPU).
- batch-embed padded:    the same with the backend's batches padded (today's path), for the packed / padded ratio.

So batch-embed's time includes work sentence-transformers' does not do. The embeddings of both are compared (cosine)
before timing counts. Runs are interleaved, --repeats each; medians, rows/s, tokens/s (real tokens after truncation,
the same count for both) and the ratio (> 1: batch-embed faster).

Memory. Peak RSS of a fresh process running batch-embed on --memory-rows rows each (the texts above, cycled, unique
ids). Flat means the pipeline holds a bounded window of rows, not the corpus. By default this uses a tiny random
model (so 50k rows take a minute on 2 cores, and the model's own memory does not hide growth); --memory-model
smollm2-135m uses the real one.

    python benchmarks/bench_batch_embed.py [--limit 5000] [--batch-size 32] [--dtype fp32|bf16] [--repeats 3]
        [--memory-rows 10000,50000] [--memory-model tiny] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import agreement, append_jsonl, check, environment, interleaved, medians, mixed_corpus

from bidir_core.embeddings_artifact import read_embeddings
from bidir_core.encoder import PACKED_DEFAULT
from bidir_core.errors import BidirError
from bidir_core.sources import resolve_source
from bidir_core.tokenization import load_tokenizer, tokenize
from bidir_serve import BatchEmbedConfig, embed_corpus

PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def packing(on: bool):
    """The torch backend's default (packed or padded batches, bidir_core.encoder.PACKED_DEFAULT), set for one run:
    batch-embed has no switch of its own for it."""
    saved = dict(PACKED_DEFAULT)
    PACKED_DEFAULT.update(dict.fromkeys(saved, on))
    try:
        yield
    finally:
        PACKED_DEFAULT.update(saved)


def write_jsonl(path: Path, texts: list[str], rows: int | None = None) -> Path:
    rows = rows or len(texts)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "text": texts[i % len(texts)]}) + "\n")
    return path


def peak_rss_child(model: str, rows: int, dtype: str, batch_size: int, texts_file: Path) -> float:
    """Peak RSS (MiB) of a fresh process running batch-embed on `rows` rows."""
    code = f"""
import json, resource, sys, tempfile
from pathlib import Path
sys.path[:0] = {sys.path!r}
from bidir_serve import BatchEmbedConfig, embed_corpus
texts = json.loads(Path({str(texts_file)!r}).read_text())
with tempfile.TemporaryDirectory() as tmp:
    inp = Path(tmp) / "in.jsonl"
    with inp.open("w") as f:
        for i in range({rows}):
            f.write(json.dumps({{"id": f"r{{i}}", "text": texts[i % len(texts)]}}) + "\\n")
    s = embed_corpus(BatchEmbedConfig({model!r}, str(inp), str(Path(tmp) / "out"), prompt="none",
        precision={dtype!r}, device="cpu", max_batch_size={batch_size}, progress=False))
    assert s.complete and s.rows_embedded == {rows}
# VmHWM (this process's peak resident set), not ru_maxrss: Linux carries ru_maxrss over from the parent across
# fork + exec, so it would report the benchmark's own peak.
status = Path("/proc/self/status").read_text()
print(int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"bench_batch_embed: memory run failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def bench_throughput(args, ckpt: Path, texts: list[str], tokens: int, tmp: Path):
    """Interleaved timed runs of both sides; returns (seconds, medians, ratio, check)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(ckpt), device="cpu", model_kwargs={"dtype": PRECISION[args.dtype]})
    inp = write_jsonl(tmp / "in.jsonl", texts)

    def run_st():
        return st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)

    def run_ours(packed: bool = True):
        with packing(packed):
            return _run_ours()

    def _run_ours():
        cfg = BatchEmbedConfig(
            str(ckpt),
            str(inp),
            str(tmp / "out"),
            prompt="none",
            precision=args.dtype,
            device="cpu",
            max_batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            overwrite=True,
            progress=False,
        )
        embed_corpus(cfg)
        return read_embeddings(tmp / "out").embeddings()

    runs = {
        "sentence-transformers": run_st,
        "batch-embed": run_ours,
        "batch-embed padded": lambda: run_ours(False),
    }
    check_first, outs = {}, {}

    def after(r: int, name: str, seconds: float, out) -> None:
        print(f"  run {r + 1} {name}: {seconds:.1f} s", flush=True)
        outs[name] = out
        if r == 0 and len(outs) == len(runs):  # the first round: every embedding, before timing counts
            packed_vs_padded = agreement(outs["batch-embed"], outs["batch-embed padded"])
            check(
                "  check packed vs padded",
                f"max |diff| {packed_vs_padded['max_abs_diff']:.2e}, median cosine "
                f"{packed_vs_padded['median_cosine']:.6f}",
                packed_vs_padded["min_cosine"] >= 0.9999
                if args.dtype == "fp32"
                else packed_vs_padded["median_cosine"] >= 0.99,
                "bench_batch_embed: batch-embed packed and padded disagree",
            )
            check_first.update(agreement(outs["batch-embed"], outs["sentence-transformers"]))
            # fp32: the same math on both sides. bf16: sentence-transformers mean-pools in bf16, whose sums over
            # hundreds of tokens drift (min cosine down to ~0.93 on long rows), while bidir pools in fp32; so the
            # bf16 check is on the median row.
            ok = (
                check_first["min_cosine"] >= 0.9999
                if args.dtype == "fp32"
                else check_first["median_cosine"] >= 0.99
            )
            check(
                "  check",
                f"max |diff| {check_first['max_abs_diff']:.2e}, min cosine {check_first['min_cosine']:.6f}, "
                f"median cosine {check_first['median_cosine']:.6f}",
                ok,
                "bench_batch_embed: batch-embed and sentence-transformers disagree",
            )

    times = interleaved(runs, [()] * args.repeats, after=after)
    med = medians(times)
    print(f"\n{'path':<22} {'median s':>9} {'rows/s':>9} {'tokens/s':>9}")
    for name, s in med.items():
        print(f"{name:<22} {s:>9.1f} {len(texts) / s:>9.1f} {tokens / s:>9.0f}")
    ratio = med["sentence-transformers"] / med["batch-embed"]
    print(f"speed ratio batch-embed / sentence-transformers: {ratio:.2f}x (target >= 1.5x)")
    print(f"speed ratio batch-embed packed / padded: {med['batch-embed padded'] / med['batch-embed']:.2f}x")

    return times, med, ratio, check_first


def bench_memory(args, texts: list[str], tmp: Path) -> dict[int, float]:
    """Peak RSS of batch-embed in a fresh process per row count."""
    memory: dict[int, float] = {}
    rows_list = [int(x) for x in args.memory_rows.split(",") if x.strip()]
    if rows_list:
        mem_model = args.memory_model
        if mem_model == "tiny":
            from bidir_core.checkpoint import EncoderConfig
            from bidir_core.testing import tiny_encoder

            mem_model = str(tiny_encoder(EncoderConfig(max_length=256)).save_pretrained(tmp / "tiny"))
        texts_file = tmp / "texts.json"
        texts_file.write_text(json.dumps(texts))
        for rows in rows_list:
            t0 = time.perf_counter()
            memory[rows] = peak_rss_child(mem_model, rows, args.dtype, args.batch_size, texts_file)
            print(
                f"peak RSS batch-embed {rows} rows ({args.memory_model}): {memory[rows]:.0f} MiB "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        if len(memory) > 1:
            lo, hi = memory[rows_list[0]], memory[rows_list[-1]]
            print(f"peak RSS {rows_list[-1]} vs {rows_list[0]} rows: {hi / lo:.3f}x ({hi - lo:+.0f} MiB)")
    return memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default="smollm2-135m", help="a bidir checkpoint folder (default: the embedded one)"
    )
    ap.add_argument("--limit", type=int, default=5000, help="texts for the throughput runs (default 5000)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", choices=tuple(PRECISION), default="fp32")
    ap.add_argument(
        "--max-batch-tokens",
        type=int,
        default=BatchEmbedConfig("", "", "").max_batch_tokens,
        help="batch-embed's padded-token budget per batch (default: the library's)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side; medians are reported")
    ap.add_argument("--memory-rows", default="10000,50000", help="comma-separated row counts ('' to skip)")
    ap.add_argument(
        "--memory-model", default="tiny", help="'tiny' (random tiny Llama) or a model for the memory runs"
    )
    ap.add_argument("--only", choices=("throughput", "memory"), help="run one part only")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line with all figures")
    args = ap.parse_args()
    if min(args.limit, args.batch_size, args.repeats) < 1:
        sys.exit("bench_batch_embed: --limit, --batch-size and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from sentence_transformers import __version__ as st_version

    try:
        ckpt = resolve_source(args.model)
    except BidirError as e:
        sys.exit(f"bench_batch_embed: {e}")
    print(
        f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, sentence-transformers {st_version}; model {ckpt}, {args.dtype}, batch {args.batch_size}"
    )
    if torch.cuda.is_available():
        print("note: CUDA is present but this benchmark measures on CPU")

    texts = mixed_corpus("bench_batch_embed", args.limit)
    tokenizer = load_tokenizer(ckpt)
    ids, n_cut = tokenize(tokenizer, texts, 512)
    tokens = sum(len(r) for r in ids)
    lengths = sorted(len(r) for r in ids)
    print(
        f"{len(texts)} texts, {tokens} tokens (median {lengths[len(lengths) // 2]}, max {lengths[-1]}, "
        f"{n_cut} truncated to 512)"
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench_batch_embed."))
    times, med, ratio, agree, memory = {}, None, None, {}, {}
    if args.only != "memory":
        times, med, ratio, agree = bench_throughput(args, ckpt, texts, tokens, tmp)
    if args.only != "throughput":
        memory = bench_memory(args, texts, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        record = {
            "benchmark": "bench_batch_embed",
            **environment(),
            "shapes": {
                "texts": len(texts),
                "tokens": tokens,
                "batch_size": args.batch_size,
                "max_batch_tokens": args.max_batch_tokens,
                "dtype": args.dtype,
            },
            "seconds": times,
            "median_s": med,
            "ratio": ratio,
            "check": agree,
            "peak_rss_mib": memory,
            "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        append_jsonl(args.json, record)


if __name__ == "__main__":
    main()
