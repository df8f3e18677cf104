"""Encoding throughput across length distributions: BiEncoder.encode, padded and packed, vs sentence-transformers,
the transformers loop and onnxruntime, each set against the machine's GEMM ceiling.

Paths, each timed from texts to L2-normalized, mean-pooled float32 embeddings, tokenizing included, same weights,
dtype, batch size and max_length:

- transformers loop:     the AutoModel (a LlamaModel, is_causal false) that sentence-transformers loaded (one copy
                         of the weights) + AutoTokenizer; tokenizer(batch, padding=True, truncation=True,
                         max_length) on input-order batches, masked mean, normalize.
- sentence-transformers: SentenceTransformer(checkpoint).encode(texts, batch_size), max_seq_length = max_length:
                         its own length sorting, each batch padded to its longest text.
- bidir padded:          BiEncoder.encode(packed=False): length-sorted batches of batch_size texts, each padded to
                         its longest.
- bidir packed:          BiEncoder.encode(packed=True): length-sorted packed batches (bidir_core.packed: one token
                         stream, no padding) of at most --max-tokens real tokens and batch_size texts, with the
                         device's default attention kernel; --kernels adds a row per other kernel (dense, flex).
- onnxruntime fp32:      the export-onnx graph of the checkpoint (--onnx DIR, else exported once into a temporary
                         folder; --no-onnx skips it), all graph optimizations on, as many intra-op threads as torch;
                         bidir's tokenization, length-sorted batches of batch_size texts padded to their longest.
                         "basic-opt": the same graph with basic optimizations only (no fusions). CPU only, and only
                         when fp32 is among --dtypes.

Corpora (--corpora, comma-separated; --limit, the number of texts, applies to each, default in brackets):

- short     [400]: STS-B train sentences (the first 400: 3,037 tokens, ~8 a text).
- long       [32]: Cranfield abstracts, title + text (6,172 tokens, ~190 a text; up to 463).
- mixed     [200]: the two shuffled, 28 % long (harness.mixed_corpus), at the checkpoint's max_length (12,810
                   tokens).
- mixed-cut [200]: the same texts with max_length 64 on every path, so truncation is exercised (4,646 tokens).
- stsb      [all]: both sentence columns of STS-B dev (not in the default set).
(Token counts: the embedded default's tokenizer. The transformers loop pads input-order batches: on mixed it runs
82,440 tokens a round against 21,960 for length-sorted padding, the most time of any path.)

Per corpus, each path first runs on the first batch (the warm-up), whose embeddings are checked against the
transformers loop at that dtype (fp32: max |diff| <= 1e-4; bf16: median cosine >= 0.99). Then every path of every
dtype runs once per round, back to back, for --repeats rounds (harness.interleaved); the cores other processes keep
busy are measured for 0.5 s before each round (a warning above 0.3) and recorded. Reported per path: the median
seconds, real tokens/s (padding not counted), the speed ratio to sentence-transformers and to bidir padded (> 1:
faster), the min / median cosine of its embeddings of the whole corpus (first round) to bidir packed fp32's, and
the % of the GEMM ceiling:

    % of GEMM ceiling = real tokens/s x FLOPs per token / FLOP/s of torch.matmul at the path's dtype
    FLOPs per token   = 2 x non-embedding parameters                 (one multiply-add per weight per token)
                      + 4 x layers x hidden x L                       (QK^T and AV: 2 x hidden x L each per layer)

where L is the length of the text a token belongs to, averaged over the corpus's tokens (sum n^2 / sum n over its
texts, n real tokens per text: a token of a long text attends to more tokens), and the FLOP/s are
harness.gemm_flops at the model's MLP shape, (4096 x hidden) @ (hidden x intermediate), on the same threads.
Padding, pooling and tokenizing count as no useful work. The last lines give, per dtype, packed / sentence-
transformers over the corpora, min..max: the range the READMEs quote. Runs on CUDA when available, else on CPU.

    # the full run: about 40 minutes on 2 quiet CPU cores, an hour with the cores shared (a third less with
    # --no-time-transformers); the embedded default, exported to ONNX first (a minute)
    nox -s bench -- --threads 2 --json runs/bench.jsonl
    python benchmarks/bench_encode.py [--corpora short,long,mixed,mixed-cut] [--limit N] [--batch-size 32]
                                      [--dtypes fp32,bf16] [--max-tokens 4096] [--kernels dense,flex]
                                      [--onnx DIR | --no-onnx] [--repeats 3] [--no-time-transformers]
                                      [--threads N] [--json PATH]
    python benchmarks/bench_encode.py --limit 16 --repeats 1 --threads 1     # a smoke run: 10 minutes on 1 thread
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from harness import (
    agreement,
    append_jsonl,
    busy_cores,
    check,
    cpu_name,
    cranfield_docs,
    environment,
    gemm_flops,
    interleaved,
    medians,
    mixed_corpus,
    stsb_sentences,
    warn_if_busy,
)
from transformers import AutoTokenizer

from bidir_core.batching import length_sorted_batches, pad_batch
from bidir_core.checkpoint import EncoderConfig, read_encoder_config
from bidir_core.devices import default_device
from bidir_core.encoder import PACKED_TOKENS, BiEncoder
from bidir_core.errors import BidirError
from bidir_core.packed_attention import KERNELS, default_kernel
from bidir_core.sources import resolve_source
from bidir_core.tokenization import tokenize

PROG = "bench_encode"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "transformers loop"
ST = "sentence-transformers"
CORPORA = {"short": 400, "long": 32, "mixed": 200, "mixed-cut": 200, "stsb": None}  # name: default --limit
CUT = 64  # mixed-cut's max_length


def load_corpus(name: str, limit: int | None) -> list[str]:
    limit = limit or CORPORA[name]
    if name in ("mixed", "mixed-cut"):
        return mixed_corpus(PROG, limit)
    texts = {"short": stsb_sentences, "long": cranfield_docs, "stsb": lambda p: stsb_sentences(p, "dev")}[
        name
    ](PROG)
    return texts[:limit]


def transformers_loop(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> torch.Tensor:
    """What a transformers user writes: tokenize each input-order batch, run, masked mean, normalize."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = texts[i : i + batch_size]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = enc.to(model.device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(F.normalize(emb, p=2, dim=-1).cpu())
    return torch.cat(out)


def onnx_path(model_file: Path, tokenizer, batch_size: int, level, threads: int):
    """run(texts, max_length): the ORT session on length-sorted batches, padded to their longest, in input order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    def run(texts: list[str], max_length: int) -> torch.Tensor:
        ids, _ = tokenize(tokenizer, texts, max_length)
        rows = [None] * len(texts)
        for batch in length_sorted_batches([len(r) for r in ids], batch_size):
            input_ids, mask = pad_batch([ids[i] for i in batch], tokenizer.pad_token_id)
            feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
            for i, emb in zip(batch, session.run(["embeddings"], feeds)[0], strict=True):
                rows[i] = emb
        return torch.from_numpy(np.stack(rows))

    return run


def load_paths(name: str, ckpt: Path, tokenizer, args, device: str, onnx_file: Path | None):
    """({path: run(texts, max_length) -> (N, D) float32 embeddings} at one dtype, bidir's encoder)."""
    from sentence_transformers import SentenceTransformer

    dtype, bs = DTYPES[name], args.batch_size
    st = SentenceTransformer(str(ckpt), device=device, model_kwargs={"dtype": dtype})
    encoder = BiEncoder.from_pretrained(ckpt, dtype=dtype, device=device).eval()

    def sentence_transformers(texts, max_length):
        st.max_seq_length = max_length
        return torch.from_numpy(st.encode(texts, batch_size=bs, convert_to_numpy=True))

    def bidir(packed: bool, kernel: str = "auto"):
        def run(texts, max_length):
            encoder.config = replace(encoder.config, max_length=max_length)  # what encode truncates to
            encoder.model.attention_kernel = kernel
            max_tokens = args.max_tokens if packed else None
            return torch.from_numpy(
                encoder.encode(texts, batch_size=bs, packed=packed, max_tokens=max_tokens)
            )

        return run

    paths = {
        BASELINE: lambda texts, max_length: transformers_loop(
            st[0].auto_model, tokenizer, texts, bs, max_length
        ),
        ST: sentence_transformers,
        "bidir padded": bidir(packed=False),
        "bidir packed": bidir(packed=True),
    }
    for kernel in args.kernels:
        if kernel not in (default_kernel(device, grad=False), "auto"):
            paths[f"bidir packed {kernel}"] = bidir(packed=True, kernel=kernel)
    if onnx_file is not None and name == "fp32":
        from onnxruntime import GraphOptimizationLevel as Level

        threads = torch.get_num_threads()
        ours = encoder.tokenizer  # bidir's tokenizer (its pad token), as export-onnx's users run it
        paths["onnxruntime fp32"] = onnx_path(onnx_file, ours, bs, Level.ORT_ENABLE_ALL, threads)
        paths["onnxruntime fp32 basic-opt"] = onnx_path(onnx_file, ours, bs, Level.ORT_ENABLE_BASIC, threads)
    return paths, encoder


def export(ckpt: Path, onnx_dir: Path | None) -> Path:
    """The fp32 ONNX model file: of the export in onnx_dir, else of one made now in a temporary folder."""
    from bidir_core.artifacts import read_manifest
    from bidir_export.onnx_export import export_onnx

    if onnx_dir is None:
        onnx_dir = Path(tempfile.mkdtemp(prefix="bench-encode-")) / "onnx"
        atexit.register(shutil.rmtree, onnx_dir.parent, ignore_errors=True)
        export_onnx(ckpt, onnx_dir, progress=lambda m: print(m, file=sys.stderr))
    try:
        manifest = read_manifest(onnx_dir, "onnx")
    except BidirError as e:
        sys.exit(f"{PROG}: {e}")
    if manifest.dtype != "fp32" or manifest.with_dims:
        sys.exit(f"{PROG}: {onnx_dir} must be a plain fp32 export (no --with-dims)")
    return onnx_dir / manifest.model_file


def bench_corpus(paths: dict, texts: list[str], max_length: int, args, device: str) -> dict:
    """Check each path on the first batch, time every (dtype, path) in interleaved rounds, keep round 1's output."""
    bs = args.batch_size
    checks = {}
    for name, runs in paths.items():
        first = {path: run(texts[:bs], max_length) for path, run in runs.items()}  # warm-up, and the check
        for path in list(runs)[1:]:
            agree = agreement(first[path], first[BASELINE])
            diff, cos, median = agree["max_abs_diff"], agree["min_cosine"], agree["median_cosine"]
            checks[(name, path)] = agree
            check(
                f"{name} {path} vs {BASELINE}",
                f"max |diff| {diff:.2e}, min cosine {cos:.6f}, median cosine {median:.6f}",
                # fp32: onnxruntime too: its fused Attention / RMSNormalization kernels came within 2.3e-5 of the
                # loop on every default corpus.
                # bf16: a bf16 residual stream rounds differently in every kernel and layout (padded or packed, one
                # library or another), and over 30 layers a few long texts drift (min cosine ~0.87 against the
                # padded bf16 loop, as far as a padded bf16 batch is from fp32): checked on the median row.
                diff <= 1e-4 if name == "fp32" else median >= 0.99,
                f"{PROG}: {name} {path} disagrees with the transformers baseline",
            )
    runs = {
        (name, path): run
        for name, by_path in paths.items()
        for path, run in by_path.items()
        if path != BASELINE or args.time_transformers
    }
    busy: list[float] = []

    def rounds():  # the busy cores are measured just before each round starts
        for _ in range(args.repeats):
            busy.append(busy_cores(0.5))
            if busy[-1] > 0.3:
                print(f"warning: {busy[-1]:.1f} cores busy with other processes before this round")
            yield (texts, max_length)

    outputs = {}

    def after(i, key, seconds, out):
        print(f"  round {i + 1} {key[0]} {key[1]}: {seconds:.2f} s", flush=True)
        if i == 0:
            outputs[key] = out

    times = interleaved(runs, rounds(), device=device, after=after)
    return {"seconds": times, "busy_cores": busy, "outputs": outputs, "checks": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--corpora", default="short,long,mixed,mixed-cut", help=f"comma-separated: {', '.join(CORPORA)}"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument(
        "--max-tokens", type=int, default=PACKED_TOKENS, help="bidir packed: real tokens per batch"
    )
    ap.add_argument(
        "--kernels", default="", help="comma-separated packed kernels to time besides the default"
    )
    ap.add_argument("--onnx", type=Path, default=None, help="an fp32 export-onnx folder of --model to reuse")
    ap.add_argument("--no-onnx", dest="use_onnx", action="store_false", help="no onnxruntime rows")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per corpus; the median is reported")
    ap.add_argument(
        "--no-time-transformers",
        dest="time_transformers",
        action="store_false",
        help="the transformers loop checks the first batch only (it pads input-order batches: the slowest path)",
    )
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        help="the first N texts of each corpus (default: per corpus, see above)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line with all figures")
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="a bidir checkpoint folder (default: the embedded default model)",
    )
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if unknown := [d for d in dtypes if d not in DTYPES]:
        sys.exit(f"{PROG}: unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    if unknown := [c for c in corpora if c not in CORPORA]:
        sys.exit(f"{PROG}: unknown corpus {unknown[0]!r}; choose from {', '.join(CORPORA)}")
    if not corpora:
        sys.exit(f"{PROG}: --corpora names no corpus; choose from {', '.join(CORPORA)}")
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if unknown := [k for k in args.kernels if k not in KERNELS]:
        sys.exit(f"{PROG}: unknown kernel {unknown[0]!r}; choose from {', '.join(KERNELS)}")
    if min(args.batch_size, args.repeats, args.limit or 1, args.max_tokens) < 1:
        sys.exit(f"{PROG}: --batch-size, --repeats, --limit and --max-tokens must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    # mixed-cut truncates on purpose; encode's warning that counts the cut texts would repeat every round
    warnings.filterwarnings("ignore", message=r".* texts were longer than max_length")

    try:
        ckpt = resolve_source(args.model)
    except BidirError as e:
        sys.exit(f"{PROG}: {e}")
    device = default_device()
    cuda = torch.cuda.get_device_name(0) if device == "cuda" else None
    print(f"measuring on CUDA: {cuda}" if cuda else f"no CUDA: measuring on CPU: {cpu_name()}")
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} CPU threads")
    busy = warn_if_busy()

    onnx_file, skipped = None, {}
    if not args.use_onnx:
        skipped["onnxruntime"] = "--no-onnx"
    elif device != "cpu" or "fp32" not in dtypes:
        skipped["onnxruntime"] = "measured on CPU, at fp32, only"
    else:
        onnx_file = export(ckpt, args.onnx)

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model_max_length = (read_encoder_config(ckpt) or EncoderConfig()).max_length
    paths, encoders = {}, {}
    for name in dtypes:
        paths[name], encoders[name] = load_paths(name, ckpt, tokenizer, args, device, onnx_file)
    # bidir packed fp32 is the accuracy reference: timed when fp32 is, else run once per corpus by this encoder
    reference = None if "fp32" in dtypes else BiEncoder.from_pretrained(ckpt, device=device).eval()

    # The FLOPs of one token, and what the hardware's matmuls reach at the MLP's shape (see the docstring).
    model = encoders[dtypes[0]].model
    config = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    flops = {
        name: gemm_flops(DTYPES[name], hidden, config.intermediate_size, device=device, threads=threads)
        for name in DTYPES
    }
    print(
        f"GEMM ceiling, (4096 x {hidden}) @ ({hidden} x {config.intermediate_size}): "
        + ", ".join(f"{name} {f / 1e9:.1f} GFLOP/s" for name, f in flops.items())
        + f"; {body:,} non-embedding parameters, {layers} layers"
    )

    results, summary = {}, {name: {} for name in dtypes}
    for corpus in corpora:
        texts = load_corpus(corpus, args.limit)
        max_length = CUT if corpus == "mixed-cut" else model_max_length
        ids, n_cut = tokenize(tokenizer, texts, max_length)
        lengths = [len(row) for row in ids]
        tokens = sum(lengths)
        attended = sum(n * n for n in lengths) / tokens  # L: the mean length a token attends over
        per_token = 2 * body + 4 * layers * hidden * attended
        sorted_batches = length_sorted_batches(lengths, args.batch_size)
        shape = {
            "texts": len(texts),
            "max_length": max_length,
            "truncated_texts": n_cut,
            "real_tokens": tokens,
            "mean_tokens_per_text": round(tokens / len(texts), 1),
            "max_tokens_per_text": max(lengths),
            "padded_tokens_length_sorted": sum(len(b) * max(lengths[i] for i in b) for b in sorted_batches),
            "attended_length": round(attended, 1),
            "flops_per_token": round(per_token),
        }
        print(f"\n== {corpus}: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in shape.items()))
        with torch.inference_mode():
            run = bench_corpus(paths, texts, max_length, args, device)
            if reference is not None:
                reference.config = replace(reference.config, max_length=max_length)
                fp32 = torch.from_numpy(reference.encode(texts, batch_size=args.batch_size, packed=True))
            else:
                fp32 = run["outputs"][("fp32", "bidir packed")]

        med = medians(run["seconds"])
        rows = {}
        for (name, path), seconds in med.items():
            st_s, padded_s = med[(name, ST)], med[(name, "bidir padded")]
            agree = agreement(run["outputs"][(name, path)], fp32)
            # onnxruntime's rows run in fp32, so they are set against the fp32 ceiling
            rows.setdefault(name, {})[path] = {
                "seconds": run["seconds"][(name, path)],
                "median_s": seconds,
                "tokens_per_s": tokens / seconds,
                "texts_per_s": len(texts) / seconds,
                "vs_sentence_transformers": st_s / seconds,
                "vs_padded": padded_s / seconds,
                "min_cos_vs_fp32": agree["min_cosine"],
                "median_cos_vs_fp32": agree["median_cosine"],
                "gemm_ceiling_pct": 100 * tokens / seconds * per_token / flops[name],
                "check_first_batch": run["checks"].get((name, path)),
            }
        for name in dtypes:
            summary[name][corpus] = rows[name]["bidir packed"]["vs_sentence_transformers"]
        results[corpus] = {"shape": shape, "busy_cores": run["busy_cores"], "paths": rows}

        print(f"\n{corpus}: medians of {args.repeats} rounds, busy cores before each: {run['busy_cores']}")
        print(
            f"{'dtype':<6} {'path':<28} {'median s':>9} {'real tok/s':>11} {'vs ST':>7} {'vs padded':>10} "
            f"{'min cos':>8} {'med cos':>8} {'% GEMM':>7}"
        )
        for name, by_path in rows.items():
            for path, r in by_path.items():
                print(
                    f"{name:<6} {path:<28} {r['median_s']:>9.2f} {r['tokens_per_s']:>11.1f} "
                    f"{r['vs_sentence_transformers']:>6.2f}x {r['vs_padded']:>9.2f}x "
                    f"{r['min_cos_vs_fp32']:>8.5f} {r['median_cos_vs_fp32']:>8.5f} {r['gemm_ceiling_pct']:>6.1f}%"
                )

    print()
    for name, ratios in summary.items():
        lo, hi = min(ratios, key=ratios.get), max(ratios, key=ratios.get)
        print(
            f"{name} bidir packed / sentence-transformers: {ratios[lo]:.2f}x ({lo}) .. {ratios[hi]:.2f}x ({hi}) "
            f"over {', '.join(ratios)}"
        )
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    if args.json:
        record = {
            "benchmark": PROG,
            **environment(busy_cores_start=busy),
            "model": str(args.model),
            "settings": {
                "batch_size": args.batch_size,
                "max_tokens": args.max_tokens,
                "repeats": args.repeats,
                "limit": args.limit,
                "onnx": str(args.onnx) if args.onnx else None,
            },
            "gemm": {
                "shape": [4096, hidden, config.intermediate_size],
                "flops_per_s": flops,
                "non_embedding_params": body,
                "layers": layers,
                "hidden": hidden,
            },
            "corpora": results,
            "packed_vs_sentence_transformers": summary,
            "skipped": skipped,
        }
        append_jsonl(args.json, record)


if __name__ == "__main__":
    main()
